import argparse
import json

from services.gateway.app import create_app
from services.gateway.openapi import spec
from shared.config import Settings
from shared.service import Command, main


def openapi(settings: Settings, args: argparse.Namespace) -> int:
    print(json.dumps(spec(), indent=2))
    return 0


main(
    "gateway", create_app, port=lambda s: s.port, needs=("NATS_URL", "UPSTREAM_BASE_URL"),
    commands={"openapi": Command("print the OpenAPI 3.1 document of the public and admin API", openapi)},
)  # fmt: skip
