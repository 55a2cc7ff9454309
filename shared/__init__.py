"""Code every service shares: the bus contract, config, logging, metrics, NATS and Postgres helpers."""
