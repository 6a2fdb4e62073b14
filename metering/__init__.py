"""Usage metering and billing-limit enforcement for a realtime messaging platform."""

__version__ = "0.1.0"
