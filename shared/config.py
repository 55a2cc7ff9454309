"""The node's configuration: every variable, typed, validated at start, in one place.

Names follow routstr-core where one exists so an operator can move a `.env` over unchanged.
`SETTINGS_DOC` drives `.env.example`, the README table and the Helm chart values; a test keeps
them in step.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
from dotenv import dotenv_values


class ConfigError(ValueError):
    """A configuration variable is missing or malformed; the message names it."""


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None


def _decimal(name: str, raw: str) -> Decimal:
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{name}: expected a non-negative number, got {raw!r}")
    return value


def _list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    raw = raw.strip()
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(f"{name}: expected a {'/'.join(schemes)} URL, got {raw!r}")
    return raw


def _mint(name: str, raw: str) -> str:
    return _url(name, raw, ("http", "https")).rstrip("/")


def _file(name: str, raw: str) -> str:
    raw = raw.strip()
    if raw and not Path(raw).is_file():
        raise ConfigError(f"{name}: no such file {raw!r}")
    return raw


def _networks(name: str, raw: str) -> tuple[str, ...]:
    """CIDRs, normalised (`10.0.0.0/8`, `::1/128`); a bare address is its own /32 or /128."""
    try:
        return tuple(str(ipaddress.ip_network(part, strict=False)) for part in _list(raw))
    except ValueError as exc:
        raise ConfigError(f"{name}: expected comma-separated CIDRs ({exc})") from None


# name -> (default, description, secret). Order is the order of the docs.
SETTINGS_DOC: dict[str, tuple[str, str, bool]] = {
    "NAME": ("Routstr Node", "Node name shown in /v1/info and the Nostr announcement", False),
    "DESCRIPTION": ("A Routstr node", "Free-text description for /v1/info and the announcement", False),
    "HTTP_URL": ("", "Public https URL of the gateway; without it or ONION_URL nothing is announced", False),
    "ONION_URL": ("", "Public .onion URL of the gateway", False),
    "PROVIDER_ID": ("", "Stable `d` tag of the announcement; derived from the node key when empty", False),
    "NSEC": ("", "Nostr secret key (nsec1… or hex); a key is generated once and stored when empty", True),
    "RELAYS": (
        "wss://relay.routstr.com,wss://relay.damus.io,wss://nos.lol",
        "Comma-separated ws(s) relays the node announces on and reads peers from",
        False,
    ),
    "UPSTREAM_BASE_URL": ("", "OpenAI-compatible upstream base URL, e.g. https://api.openai.com/v1", False),
    "UPSTREAM_API_KEY": ("", "Key the gateway sends upstream; clients' credentials are never forwarded", True),
    "PROVIDERS_PATH": (
        "",
        "YAML file of upstream providers (slug, provider_type, base_url, api_key_env, provider_fee, priority, models)"
        ", applied at start",
        False,
    ),
    "UPSTREAM_COOLDOWN": ("30", "Seconds a failing provider is left out of routing before it is probed again", False),
    "UPSTREAM_FIRST_BYTE_TIMEOUT": (
        "60",
        "Seconds to wait for a provider's answer before trying the next one (at most UPSTREAM_TIMEOUT)",
        False,
    ),
    "UPSTREAM_TIMEOUT": (
        "300",
        "Longest silence in seconds from an upstream: caps UPSTREAM_FIRST_BYTE_TIMEOUT, the default of"
        " UPSTREAM_IDLE_TIMEOUT (a stream that keeps producing is never cut)",
        False,
    ),
    "UPSTREAM_CONNECT_TIMEOUT": ("10", "Seconds to connect to the upstream", False),
    "UPSTREAM_IDLE_TIMEOUT": (
        "",
        "Longest gap in seconds between two reads of an upstream answer; empty = UPSTREAM_TIMEOUT",
        False,
    ),
    "CASHU_MINTS": ("", "Comma-separated mint URLs whose tokens the node accepts", False),
    "CASHU_FOREIGN_MAX_SATS": (
        "10000",
        "Largest token (sats) from a mint not in CASHU_MINTS that is swapped in over Lightning; 0 = refuse them",
        False,
    ),
    "CASHU_FOREIGN_HOURLY_SATS": ("100000", "Sats a rolling hour swapped in from mints not in CASHU_MINTS", False),
    "DATABASE_URL": ("", "Postgres URL; `make run` starts its own Postgres when empty", True),
    "NATS_URL": ("", "NATS URL (JetStream enabled); `make run` starts its own NATS when empty", False),
    "PORT": ("8000", "Gateway listen port", False),
    "HOST": ("0.0.0.0", "Listen address of every service (`make run`: 127.0.0.1 unless set)", False),
    "BILLING_PORT": ("8001", "Billing health/metrics port", False),
    "WALLET_PORT": ("8002", "Wallet health/metrics port", False),
    "DISCOVERY_PORT": ("8003", "Discovery health/metrics port", False),
    "CORS_ORIGINS": ("*", "Comma-separated origins allowed by CORS, or *", False),
    "MAX_BODY_BYTES": ("10485760", "Largest request body the gateway accepts", False),
    "RATE_LIMIT_PER_MINUTE": ("600", "Requests a minute one client address may make (as a burst too); 0 = off", False),
    "FIXED_PRICING": ("false", "Charge the FIXED_* prices for every model instead of per-model prices", False),
    "FIXED_COST_PER_REQUEST": ("1", "Sats per request under FIXED_PRICING", False),
    "FIXED_PER_1K_INPUT_TOKENS": ("0", "Sats per 1000 prompt tokens under FIXED_PRICING", False),
    "FIXED_PER_1K_OUTPUT_TOKENS": ("0", "Sats per 1000 completion tokens under FIXED_PRICING", False),
    "MODELS_PATH": ("", "JSON models file (prices in USD per token, aliases, enabled)", False),
    "BTC_USD_RATE": ("", "Fixed BTC price in USD; when empty the rate is fetched live and cached", False),
    "EXCHANGE_FEE": ("1.005", "Multiplier on the BTC/USD conversion", False),
    "UPSTREAM_PROVIDER_FEE": ("1.05", "Operator margin multiplied onto upstream USD prices", False),
    "DEFAULT_MAX_TOKENS": ("4096", "Completion tokens reserved when a request sets no max_tokens", False),
    "RESERVATION_TTL": ("900", "Seconds before an unsettled reservation is released by the sweeper", False),
    "DEPENDENCY_TIMEOUT": (
        "3",
        "Seconds a Postgres query or a mint call may take before the caller gets 503 with Retry-After",
        False,
    ),
    "PENDING_RETRY_SECONDS": (
        "10",
        "Seconds between passes that finish refunds, X-Cashu change and deposits left pending by a fault",
        False,
    ),
    "GATEWAY_GONE_AFTER": (
        "30",
        "Seconds without a heartbeat (sent every sixth of this) after which a gateway counts as gone and billing"
        " releases its X-Cashu calls' reservations",
        False,
    ),
    "QUOTA_VALIDITY_TIME": (
        "30",
        "Seconds a quota grant (RFC 4006 Validity-Time) lives unless its gateway renews it; a dead gateway's grant"
        " returns to its key after this",
        False,
    ),
    "USAGE_STREAM_REPLICAS": ("1", "JetStream replicas of the usage stream (3 on a 3-node NATS)", False),
    "ADMIN_PASSWORD": ("", "Secret for the admin API; admin is off when empty", True),
    "RECEIVE_LN_ADDRESS": ("", "Lightning address that operator revenue is paid out to", False),
    "PAYOUT_THRESHOLD_SATS": (
        "0",
        "Pay operator revenue above this many sats to RECEIVE_LN_ADDRESS automatically; 0 = never",
        False,
    ),
    "REQUEST_LOG_RETENTION_DAYS": ("90", "Days the request log (one row per paid call) is kept", False),
    "LOG_LEVEL": ("INFO", "DEBUG, INFO, WARNING or ERROR", False),
    # Security: bus credentials, TLS, secrets at rest, who may forward client addresses.
    "NATS_USER": ("", "NATS user of this service; its service name (its role in shared/bus.py) when empty", False),
    "NATS_PASSWORD": ("", "NATS password of NATS_USER; no credentials are sent when empty", True),
    "NATS_CA_FILE": ("", "CA bundle (PEM) that NATS's TLS certificate must chain to; turns TLS on", False),
    "NATS_CERT_FILE": ("", "Client certificate (PEM) for NATS mutual TLS", False),
    "NATS_KEY_FILE": ("", "Private key (PEM) of NATS_CERT_FILE", False),
    "DATABASE_CA_FILE": ("", "CA bundle (PEM) that Postgres's TLS certificate must chain to; turns TLS on", False),
    "DATABASE_CERT_FILE": ("", "Client certificate (PEM) for Postgres mutual TLS", False),
    "DATABASE_KEY_FILE": ("", "Private key (PEM) of DATABASE_CERT_FILE", False),
    "SECRETS_KEY": (
        "",
        "Comma-separated Fernet keys that encrypt the seed, Nostr key and tokens at rest; the first encrypts,"
        " all decrypt (rotation)",
        True,
    ),
    "TRUSTED_PROXIES": ("", "Comma-separated CIDRs whose X-Forwarded-For names the client; none when empty", False),
    "RATE_LIMIT_PER_KEY_PER_MINUTE": ("600", "Requests a minute one API key or token may make; 0 = off", False),
    "METRICS_PORT": ("9090", "Gateway /metrics port, apart from the public one", False),
    "LNURL_ALLOW_LOOPBACK": ("false", "Development only: let Lightning-address payouts call loopback hosts", False),
}


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    http_url: str
    onion_url: str
    provider_id: str
    nsec: str
    relays: tuple[str, ...]
    upstream_base_url: str
    upstream_api_key: str
    upstream_timeout: int
    providers_path: str
    upstream_cooldown: int
    upstream_first_byte_timeout: int
    upstream_connect_timeout: int
    upstream_idle_timeout: int
    cashu_mints: tuple[str, ...]
    cashu_foreign_max_sats: int
    cashu_foreign_hourly_sats: int
    database_url: str
    nats_url: str
    port: int
    host: str
    billing_port: int
    wallet_port: int
    discovery_port: int
    cors_origins: tuple[str, ...]
    max_body_bytes: int
    rate_limit_per_minute: int
    fixed_pricing: bool
    fixed_cost_per_request: Decimal
    fixed_per_1k_input_tokens: Decimal
    fixed_per_1k_output_tokens: Decimal
    models_path: str
    btc_usd_rate: Decimal | None
    exchange_fee: Decimal
    upstream_provider_fee: Decimal
    default_max_tokens: int
    reservation_ttl: int
    quota_validity_time: int
    usage_stream_replicas: int
    admin_password: str
    receive_ln_address: str
    payout_threshold_sats: int
    request_log_retention_days: int
    log_level: str
    nats_user: str = ""
    nats_password: str = ""
    nats_ca_file: str = ""
    nats_cert_file: str = ""
    nats_key_file: str = ""
    database_ca_file: str = ""
    database_cert_file: str = ""
    database_key_file: str = ""
    secrets_key: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    rate_limit_per_key_per_minute: int = 600
    metrics_port: int = 9090
    lnurl_allow_loopback: bool = False
    dependency_timeout: int = 3
    pending_retry_seconds: int = 10
    gateway_gone_after: int = 30

    def replace(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)


def _read_dotenv(path: Path) -> dict[str, str]:
    """A `.env` file's values, parsed by python-dotenv as shells do: quotes, `export`, inline `# comments`."""
    if not path.is_file():
        return {}
    return {key: value or "" for key, value in dotenv_values(path).items()}


RUN_ENV = Path(".run/env")  # NATS_URL and DATABASE_URL of the servers a running `make run` started


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env"), run_env: Path | None = None
) -> Settings:
    """Read, convert and validate every variable; the environment wins over `.env`, which wins over
    `run_env` (operator commands pass RUN_ENV, so they find the node `make run` started)."""
    env = dict(_read_dotenv(run_env)) if run_env else {}
    env.update(_read_dotenv(dotenv) if dotenv else {})
    env.update(os.environ if environ is None else environ)

    def get(name: str) -> str:
        return env.get(name, SETTINGS_DOC[name][0])

    def port(name: str) -> int:
        value = _int(name, get(name))
        if not 0 <= value <= 65535:
            raise ConfigError(f"{name}: expected a port number, got {value}")
        return value

    def positive(name: str) -> int:
        value = _int(name, get(name))
        if value <= 0:
            raise ConfigError(f"{name}: must be greater than 0, got {value}")
        return value

    def positive_or(name: str, fallback: str) -> int:
        return positive(name if get(name).strip() else fallback)

    def non_negative(name: str) -> int:
        value = _int(name, get(name))
        if value < 0:
            raise ConfigError(f"{name}: must be 0 or more, got {value}")
        return value

    relays = _list(get("RELAYS"))
    for relay in relays:
        _url("RELAYS", relay, ("ws", "wss"))
    level = get("LOG_LEVEL").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    rate = get("BTC_USD_RATE").strip()
    btc_usd = _decimal("BTC_USD_RATE", rate) if rate else None
    if btc_usd is not None and btc_usd <= 0:
        raise ConfigError("BTC_USD_RATE: must be greater than 0")
    nats_url = get("NATS_URL").strip()
    if nats_url:
        _url("NATS_URL", nats_url.split(",")[0], ("nats", "tls", "ws", "wss"))
    database_url = get("DATABASE_URL").strip()
    if database_url:
        _url("DATABASE_URL", database_url, ("postgres", "postgresql"))
    models_path = get("MODELS_PATH").strip()
    providers_path = get("PROVIDERS_PATH").strip()
    if providers_path and not Path(providers_path).is_file():
        raise ConfigError(f"PROVIDERS_PATH: no such file {providers_path!r}")
    if models_path and not Path(models_path).is_file():
        raise ConfigError(f"MODELS_PATH: no such file {models_path!r}")

    return Settings(
        name=get("NAME"),
        description=get("DESCRIPTION"),
        http_url=_url("HTTP_URL", get("HTTP_URL"), ("http", "https")).rstrip("/"),
        onion_url=_url("ONION_URL", get("ONION_URL"), ("http", "https")).rstrip("/"),
        provider_id=get("PROVIDER_ID").strip(),
        nsec=get("NSEC").strip(),
        relays=relays,
        upstream_base_url=_url("UPSTREAM_BASE_URL", get("UPSTREAM_BASE_URL"), ("http", "https")).rstrip("/"),
        upstream_api_key=get("UPSTREAM_API_KEY").strip(),
        upstream_timeout=positive("UPSTREAM_TIMEOUT"),
        providers_path=providers_path,
        upstream_cooldown=positive("UPSTREAM_COOLDOWN"),
        upstream_first_byte_timeout=min(positive("UPSTREAM_FIRST_BYTE_TIMEOUT"), positive("UPSTREAM_TIMEOUT")),
        upstream_connect_timeout=positive("UPSTREAM_CONNECT_TIMEOUT"),
        upstream_idle_timeout=positive_or("UPSTREAM_IDLE_TIMEOUT", "UPSTREAM_TIMEOUT"),
        cashu_mints=tuple(_mint("CASHU_MINTS", m) for m in _list(get("CASHU_MINTS"))),
        cashu_foreign_max_sats=non_negative("CASHU_FOREIGN_MAX_SATS"),
        cashu_foreign_hourly_sats=non_negative("CASHU_FOREIGN_HOURLY_SATS"),
        database_url=database_url,
        nats_url=nats_url,
        port=port("PORT"),
        host=get("HOST").strip(),
        billing_port=port("BILLING_PORT"),
        wallet_port=port("WALLET_PORT"),
        discovery_port=port("DISCOVERY_PORT"),
        cors_origins=_list(get("CORS_ORIGINS")) or ("*",),
        max_body_bytes=positive("MAX_BODY_BYTES"),
        rate_limit_per_minute=non_negative("RATE_LIMIT_PER_MINUTE"),
        fixed_pricing=_bool("FIXED_PRICING", get("FIXED_PRICING")),
        fixed_cost_per_request=_decimal("FIXED_COST_PER_REQUEST", get("FIXED_COST_PER_REQUEST")),
        fixed_per_1k_input_tokens=_decimal("FIXED_PER_1K_INPUT_TOKENS", get("FIXED_PER_1K_INPUT_TOKENS")),
        fixed_per_1k_output_tokens=_decimal("FIXED_PER_1K_OUTPUT_TOKENS", get("FIXED_PER_1K_OUTPUT_TOKENS")),
        models_path=models_path,
        btc_usd_rate=btc_usd,
        exchange_fee=_decimal("EXCHANGE_FEE", get("EXCHANGE_FEE")),
        upstream_provider_fee=_decimal("UPSTREAM_PROVIDER_FEE", get("UPSTREAM_PROVIDER_FEE")),
        default_max_tokens=positive("DEFAULT_MAX_TOKENS"),
        reservation_ttl=positive("RESERVATION_TTL"),
        quota_validity_time=positive("QUOTA_VALIDITY_TIME"),
        usage_stream_replicas=positive("USAGE_STREAM_REPLICAS"),
        admin_password=get("ADMIN_PASSWORD"),
        receive_ln_address=get("RECEIVE_LN_ADDRESS").strip(),
        payout_threshold_sats=non_negative("PAYOUT_THRESHOLD_SATS"),
        request_log_retention_days=positive("REQUEST_LOG_RETENTION_DAYS"),
        log_level=level,
        nats_user=get("NATS_USER").strip(),
        nats_password=get("NATS_PASSWORD"),
        nats_ca_file=_file("NATS_CA_FILE", get("NATS_CA_FILE")),
        nats_cert_file=_file("NATS_CERT_FILE", get("NATS_CERT_FILE")),
        nats_key_file=_file("NATS_KEY_FILE", get("NATS_KEY_FILE")),
        database_ca_file=_file("DATABASE_CA_FILE", get("DATABASE_CA_FILE")),
        database_cert_file=_file("DATABASE_CERT_FILE", get("DATABASE_CERT_FILE")),
        database_key_file=_file("DATABASE_KEY_FILE", get("DATABASE_KEY_FILE")),
        secrets_key=_list(get("SECRETS_KEY")),
        trusted_proxies=_networks("TRUSTED_PROXIES", get("TRUSTED_PROXIES")),
        rate_limit_per_key_per_minute=non_negative("RATE_LIMIT_PER_KEY_PER_MINUTE"),
        metrics_port=port("METRICS_PORT"),
        lnurl_allow_loopback=_bool("LNURL_ALLOW_LOOPBACK", get("LNURL_ALLOW_LOOPBACK")),
        dependency_timeout=positive("DEPENDENCY_TIMEOUT"),
        pending_retry_seconds=positive("PENDING_RETRY_SECONDS"),
        gateway_gone_after=positive("GATEWAY_GONE_AFTER"),
    )


def require(settings: Settings, *names: str) -> None:
    """Fail start-up with a clear message when a service needs a variable that is empty."""
    for name in names:
        if not getattr(settings, name.lower()):
            raise ConfigError(
                f"{name}: required by this service but not set (set it, or start the node with `make run`:"
                " operator commands beside it read its .run/env)"
            )
