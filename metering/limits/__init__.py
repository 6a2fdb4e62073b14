"""Package limits: levels, staff alerts (an outbox), enforcement and admission."""
