"""One app's connections, second by second, ticked and aggregated: for tests that script a
few seconds far apart (a closing hour, a day, retention)."""

from __future__ import annotations

from dataclasses import dataclass

from metering.gateway.sdk import Meter
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups.service import Aggregator


@dataclass
class Seconds:
    app: str
    meter: Meter
    g: GlobalStore
    dc: DatacenterStore
    aggregator: Aggregator

    def at(self, second: int, opened: int = 0, closed: int = 0) -> None:
        """At ``second``: open and close connections, tick, and run a committed cycle."""
        for _ in range(opened):
            self.meter.connection_opened(self.app)
        for _ in range(closed):
            self.meter.connection_closed(self.app)
        self.meter.flush()
        tick(self.g, {"dc1": self.dc}, liveness_timeout=10**6, sample_retention=10**6, now=second)
        assert self.aggregator.run().committed
