from services.gateway.app import create_app
from shared.service import main

main("gateway", create_app, port=lambda s: s.port, needs=("NATS_URL", "UPSTREAM_BASE_URL"))
