"""The test NATS's credentials: every service connects as its own bus role, test code as `test` (unrestricted).

`node_env` records each role's password as `NATS_PASSWORD_<ROLE>`; `service_env` turns that into the
one service's NATS_USER/NATS_PASSWORD and drops the harness credentials from NATS_URL, so a service
never runs with more rights than production gives it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

HARNESS_USER = "test"


def plain_url(url: str) -> str:
    """`url` without user:password@."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def harness_url(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{HARNESS_USER}:{password}@{parts.netloc}"))


def password_vars(passwords: dict[str, str]) -> dict[str, str]:
    return {f"NATS_PASSWORD_{role.upper()}": password for role, password in passwords.items()}


def service_env(env: dict[str, str], service: str) -> dict[str, str]:
    """`env` as `service` alone should see it: its own NATS user and password, no harness credentials."""
    password = env.get(f"NATS_PASSWORD_{service.upper()}")
    if password is None:
        return env
    own = {k: v for k, v in env.items() if not k.startswith("NATS_PASSWORD_")}
    own.update(NATS_URL=plain_url(env["NATS_URL"]), NATS_USER=service, NATS_PASSWORD=password)
    return own
