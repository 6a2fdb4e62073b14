"""Usage rollups: periods (minute, hour, day, month, UTC), aggregation, the stats API."""
