"""Client TLS for the node's own dependencies (NATS, Postgres), from the *_CA_FILE/*_CERT_FILE/*_KEY_FILE settings."""

from __future__ import annotations

import ssl

from shared.config import Settings


def client_context(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """A verifying client context (certificate chain and hostname checked); `ca_file` empty means the
    system's CAs; `cert_file`/`key_file` add a client certificate for mutual TLS."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context


def nats_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for NATS when NATS_CA_FILE is set or NATS_URL says `tls://`; None otherwise."""
    if not (settings.nats_ca_file or settings.nats_url.startswith("tls://")):
        return None
    return client_context(settings.nats_ca_file, settings.nats_cert_file, settings.nats_key_file)


def database_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for Postgres when DATABASE_CA_FILE is set; None leaves DATABASE_URL's own `sslmode` in charge."""
    if not settings.database_ca_file:
        return None
    return client_context(settings.database_ca_file, settings.database_cert_file, settings.database_key_file)
