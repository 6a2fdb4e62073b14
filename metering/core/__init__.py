"""Plumbing shared by every feature: settings, database, Redis, errors, logging."""
