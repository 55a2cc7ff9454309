"""Which credential a request carries, and the key it maps to.

Three shapes, as every Routstr client sends them: `Authorization: Bearer sk-…` (a balance key),
`Authorization: Bearer cashuA…/cashuB…` (a token as an implicit account), and `X-Cashu: <token>`
(pay per request, change back). X-Cashu wins over any Authorization, since plain OpenAI clients always
send a dummy one. A token maps to the account key `sk-` + sha256_hex(token), so the same token is the
same account wherever it is presented.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from aiohttp import web

_SK = re.compile(r"^sk-[0-9a-zA-Z_\-]{8,200}$")
_TOKEN = re.compile(r"^cashu[AB][A-Za-z0-9_\-+/=]+$")
MAX_TOKEN_CHARS = 65536


class CredentialError(Exception):
    """The request's credential is missing or malformed (401/400)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True, slots=True)
class Credential:
    mode: str  # "sk", "cashu" (token as bearer) or "xcashu" (per-request payment)
    api_key: str  # the sk- key the caller acts as
    key_hash: str  # what billing knows: sha256 hex of api_key
    token: str | None = None  # the Cashu token, when the credential is one


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalise_token(raw: str) -> str:
    """Strip whitespace and a `cashu:` URI prefix; reject what cannot be a token before any mint sees it."""
    token = raw.strip()
    if token.lower().startswith("cashu:"):
        token = token[len("cashu:") :]
    if len(token) > MAX_TOKEN_CHARS:
        raise CredentialError(400, "Cashu token is too large", "invalid_token")
    if not _TOKEN.match(token):
        raise CredentialError(400, "Invalid Cashu token: expected a cashuA… or cashuB… token", "invalid_token")
    return token


def from_token(token: str, mode: str) -> Credential:
    api_key = "sk-" + sha256_hex(token)
    return Credential(mode, api_key, sha256_hex(api_key), token)


def from_key(api_key: str) -> Credential:
    if not _SK.match(api_key):
        raise CredentialError(401, "Invalid API key", "invalid_api_key")
    return Credential("sk", api_key, sha256_hex(api_key))


def bearer(request: web.Request) -> str | None:
    """The Bearer value; else, on Anthropic's Messages API, its `x-api-key` header (what Anthropic SDKs send)."""
    header = request.headers.get("Authorization", "").strip()
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        anthropic_key = request.headers.get("x-api-key", "").strip() if request.path == "/v1/messages" else ""
        return anthropic_key or None
    return value.strip()


def credential(request: web.Request, allow_xcashu: bool = True) -> Credential:
    """The caller's credential; X-Cashu first, then a Bearer key or token."""
    if allow_xcashu and "X-Cashu" in request.headers:
        return from_token(normalise_token(request.headers["X-Cashu"]), "xcashu")
    value = bearer(request)
    if value is None:
        message = "Missing credentials: send Authorization: Bearer sk-… or an X-Cashu token"
        raise CredentialError(401, message, "missing_api_key")
    if value.lower().startswith("cashu"):
        return from_token(normalise_token(value), "cashu")
    return from_key(value)
