"""The SDK a frontend embeds, and the example realtime gateway built on it."""

from metering.gateway.sdk import Meter, ThreadSafeMeter
from metering.live.store import Transport

__all__ = ["Meter", "ThreadSafeMeter", "Transport"]
