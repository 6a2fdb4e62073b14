"""Live counting: frontend liveness, datacenter totals, the 1-second global tick."""
