"""How the node authenticates to an upstream provider, by provider type (billing lists models, the gateway calls)."""

from __future__ import annotations

ANTHROPIC_VERSION = "2023-06-01"  # anthropic-version header when a provider sets no api_version


def auth_headers(provider_type: str, key: str, api_version: str | None = None) -> dict[str, str]:
    """Anthropic's `x-api-key` + `anthropic-version`; everyone else's `Authorization: Bearer`. {} without a key
    (local vLLM/Ollama)."""
    if provider_type == "anthropic":
        headers = {"anthropic-version": api_version or ANTHROPIC_VERSION}
        return {**headers, "x-api-key": key} if key else headers
    return {"Authorization": f"Bearer {key}"} if key else {}
