from pathlib import Path

from services.wallet.app import create_app
from shared.service import main

main(
    "wallet",
    create_app,
    port=lambda settings: settings.wallet_port,
    migrations=Path(__file__).parent / "migrations",
    needs=("NATS_URL", "DATABASE_URL"),
)
