from pathlib import Path

from services.discovery.app import create_app
from shared.service import main

main("discovery", create_app, lambda s: s.discovery_port, Path(__file__).parent / "migrations")
