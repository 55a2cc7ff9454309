"""The gateway's side of the bus: typed calls to billing, and usage events into the usage stream."""

from __future__ import annotations

from collections import OrderedDict

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.gateway.credentials import Credential, sha256_hex
from shared import bus
from shared.messaging import BusError, request


class BillingClient:
    """Every money question the gateway asks, in one place."""

    def __init__(self, nc: NATS, js: JetStreamContext):
        self.nc = nc
        self.js = js
        # Tokens already credited to their derived key: a token used as a Bearer is presented on
        # every call, and billing would answer "already credited" anyway, so skip the round trip.
        self._deposited: OrderedDict[str, None] = OrderedDict()

    async def deposit(self, key_hash: str, token: str, create: bool, resume_only: bool = False) -> bus.KeyInfo:
        message = bus.Deposit(key_hash, token, create, resume_only)
        info = await request(self.nc, bus.BILLING_DEPOSIT, message, bus.KeyInfo, bus.MINT_TIMEOUT)
        self._remember(sha256_hex(token))
        return info

    async def ensure_account(self, cred: Credential) -> None:
        """For a token credential: make sure its value is credited to the derived key (idempotent)."""
        if cred.token is None or sha256_hex(cred.token) in self._deposited:
            return
        await self.deposit(cred.key_hash, cred.token, create=True)

    def _remember(self, token_hash: str) -> None:
        self._deposited[token_hash] = None
        if len(self._deposited) > 100_000:
            self._deposited.popitem(last=False)

    async def key_info(self, key_hash: str) -> bus.KeyInfo:
        return await request(self.nc, bus.BILLING_KEY_INFO, bus.KeyQuery(key_hash), bus.KeyInfo)

    async def reserve(self, message: bus.Reserve) -> bus.Reserved:
        return await request(self.nc, bus.BILLING_RESERVE, message, bus.Reserved)

    async def record_usage(self, usage: bus.Usage) -> None:
        """Put the usage event in the durable stream, acknowledged; the msg id makes repeats no-ops."""
        await self.js.publish(bus.USAGE_SUBJECT, bus.encode(usage), headers=self._msg_id(usage))

    async def settle(self, usage: bus.Usage) -> bus.Settled | None:
        """Settle now, so the response can show the cost and the balance is free for the next call.

        If billing does not confirm (down, slow, restarting), the event goes into the durable usage
        stream, acknowledged, and billing settles it from there: exactly once either way, since
        settlement is keyed by request id.
        """
        try:
            return await request(self.nc, bus.BILLING_SETTLE, usage, bus.Settled)
        except BusError:
            await self.record_usage(usage)
            return None

    @staticmethod
    def _msg_id(usage: bus.Usage) -> dict[str, str]:
        return {"Nats-Msg-Id": f"usage-{usage.request_id}"}

    async def refund(self, key_hash: str, lightning_address: str | None = None) -> bus.Refunded:
        return await request(
            self.nc, bus.BILLING_REFUND, bus.Refund(key_hash, lightning_address), bus.Refunded, bus.MINT_TIMEOUT
        )


    async def refund_status(self, key_hash: str) -> bus.Refunded:
        """The key's latest refund: pending, paid, or failed (its amount back on the balance)."""
        return await request(self.nc, bus.BILLING_REFUND_STATUS, bus.RefundQuery(key_hash), bus.Refunded)


def usage_from(body: dict) -> tuple[int, int, int, int] | None:
    """(prompt, completion, cache_read, cache_write) tokens from an OpenAI `usage` object, any dialect."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    try:
        prompt = int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0)
        completion = int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cache_read = int((details or {}).get("cached_tokens", 0) or usage.get("cache_read_input_tokens", 0) or 0)
        cache_write = int(usage.get("cache_creation_input_tokens", 0) or 0)
    except (TypeError, ValueError):
        return None
    return prompt, completion, cache_read, cache_write
