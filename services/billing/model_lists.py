"""What each provider says it serves: its model list, in the shape of OpenAI's / OpenRouter's `/models`.

OpenAI, OpenRouter, vLLM, Anthropic and generic servers answer `GET {base_url}/models` (`{"data": [...]}`;
OpenRouter and Routstr nodes add a `pricing` object, read for every type). Ollama answers the same on its
OpenAI-compatible `/v1/models`, and `GET /api/tags` (`{"models": [{"name": ...}]}`) natively; the
second is tried when the first fails.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from services.billing.providers import Provider
from shared.upstream_auth import auth_headers

log = logging.getLogger(__name__)
TIMEOUT = aiohttp.ClientTimeout(total=10)


async def fetch_models(session: aiohttp.ClientSession, provider: Provider, key: str) -> list[dict] | None:
    """The provider's models as dicts with at least `id`, or None when it could not be asked (logged, no key)."""
    headers = auth_headers(provider.provider_type, key, provider.api_version)
    models = await _get_list(session, f"{provider.base_url}/models", headers, "data", provider.slug)
    if models is None and provider.provider_type == "ollama":
        parts = urlsplit(provider.base_url)
        tags = await _get_list(session, urlunsplit((parts.scheme, parts.netloc, "/api/tags", "", "")), headers,
                               "models", provider.slug)  # fmt: skip
        if tags is not None:
            models = [{"id": m.get("model") or m.get("name"), "name": m.get("name")} for m in tags]
    if models is None:
        return None
    return [m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]


async def _get_list(session, url: str, headers: dict, field: str, slug: str) -> list | None:
    try:
        async with session.get(url, headers=headers, timeout=TIMEOUT) as response:
            if response.status != 200:
                log.warning("provider %s: model list answered %s", slug, response.status)
                return None
            data = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("provider %s: model list unavailable (%s)", slug, exc.__class__.__name__)
        return None
    found = data.get(field) if isinstance(data, dict) else None
    return found if isinstance(found, list) else None
