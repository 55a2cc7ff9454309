"""Error bodies in the two shapes clients parse: OpenAI's `error` object (proxy) and `detail` (balance API)."""

from __future__ import annotations

from aiohttp import web

from shared import bus

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    425: "too_early",
    429: "rate_limit_error",
}


def openai_error(
    status: int, message: str, code: str | None = None, kind: str | None = None, headers: dict | None = None
) -> web.Response:
    kind = kind or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status, headers=headers
    )


def detail_error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> web.Response:
    body = {"detail": message}
    if code:
        body["code"] = code
    return web.json_response(body, status=status, headers=headers)


def retry_headers(error: bus.Error) -> dict[str, str]:
    return {"Retry-After": str(error.retry_after)} if error.retry_after else {}


def from_bus(error: bus.Error, detail: bool = False, headers: dict | None = None) -> web.Response:
    """Render a typed bus error for the client, keeping its status and stable code."""
    merged = {**retry_headers(error), **(headers or {})}
    if detail:
        return detail_error(error.status, error.message, error.code, merged)
    return openai_error(error.status, error.message, error.code, headers=merged)
