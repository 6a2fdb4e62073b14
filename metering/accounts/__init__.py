"""Accounts, their apps, packages (limits) and API keys."""
