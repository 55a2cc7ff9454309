"""The gateway: the node's public HTTP API — auth, payment, and the streaming OpenAI-compatible proxy."""
