"""Closed doors: an authenticated bus with per-service permissions, secrets encrypted at rest, guarded
Lightning-address calls out, and trusted-proxy-only client addresses and per-key limits on calls in."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import re
import ssl
import sys
from pathlib import Path

import asyncpg
import nats
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nostr_sdk import Keys

from services.discovery.app import MIGRATIONS as DISCOVERY_MIGRATIONS
from services.discovery.identity import stored_keys
from services.wallet import storage
from services.wallet.app import MIGRATIONS as WALLET_MIGRATIONS
from services.wallet.lnurl import LnurlClient, LnurlError, public_address
from shared import bus, db, messaging, tls
from shared.config import ConfigError, load_settings
from shared.secretbox import SecretBox, is_sealed, rotate
from tests.conftest import SECRETS_KEY, UPSTREAM_KEY, node_env, serve_app
from tests.support import natsauth
from tests.support.cluster import Cluster
from tests.support.keys import funded_key
from tests.test_gateway import CHAT, auth, settled_balance

CORE = ("billing", "wallet", "gateway")
PRICES = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "1", "FIXED_PER_1K_INPUT_TOKENS": "1",
          "FIXED_PER_1K_OUTPUT_TOKENS": "1"}  # fmt: skip
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"
ROOT = Path(__file__).resolve().parents[1]

# ---- the bus: who may say what ----------------------------------------------------------------

SUBJECTS = {
    name: value for name, value in vars(bus).items()
    if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z]+(\.[a-z_]+)+", value)
}  # fmt: skip
STREAMED = {bus.USAGE_SUBJECT}  # received by JetStream (the USAGE stream), not by a subscriber


def senders(subject: str) -> set[str]:
    """Roles that may send on `subject`, leaving out a service's readiness probe to its own subjects."""
    return {
        role for role in bus.ROLES
        if bus.may_publish(role, subject)
        and not (role in bus.ANSWERS and bus.subject_matches(bus.ANSWERS[role], subject))
    }  # fmt: skip


def receivers(subject: str) -> set[str]:
    return {
        role for role in bus.ROLES
        if any(bus.subject_matches(p, subject) for p in bus.nats_permissions(role)["subscribe"]["allow"])
    }  # fmt: skip


def test_every_bus_subject_has_a_sender_and_a_receiver_in_the_permission_table():
    assert len(SUBJECTS) >= 18 and "WALLET_ISSUE" in SUBJECTS
    for name, subject in SUBJECTS.items():
        assert senders(subject), f"{name} ({subject}): no role may send it; add it to a role in bus.ROLES"
        assert subject in STREAMED or receivers(subject), f"{name} ({subject}): no role may receive it"


@pytest.mark.parametrize(
    ("subject", "only"),
    [
        (bus.WALLET_ISSUE, {"billing"}), (bus.WALLET_PAY, {"billing"}), (bus.WALLET_REDEEM, {"billing"}),
        (bus.BILLING_RESERVE, {"gateway"}), (bus.BILLING_SETTLE, {"gateway"}), (bus.USAGE_SUBJECT, {"gateway"}),
        (bus.BILLING_CREATE_KEY, {"operator"}), (bus.BILLING_RECONCILE, {"operator"}),
        (bus.BILLING_CREDIT_CONTROL, {"gateway"}), (bus.QUOTA_RECALL, {"billing"}),
    ],
)  # fmt: skip
def test_only_the_named_roles_may_send(subject, only):
    assert senders(subject) == only


def test_each_role_reads_only_its_own_replies():
    for role in bus.ROLES:
        allowed = bus.nats_permissions(role)["subscribe"]["allow"]
        inboxes = [p for p in allowed if p.startswith("_INBOX")]
        assert inboxes == [f"_INBOX.{role}.>"], role
        assert not bus.subject_matches(inboxes[0], "_INBOX.billing.abc.1") or role == "billing"


async def connect_as(url: str, user: str | None, password: str | None, errors: list[str]):
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    options = {"user": user, "password": password, "inbox_prefix": bus.inbox_prefix(user)} if user else {}
    return await nats.connect(
        url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, error_cb=on_error, **options
    )


async def test_nats_refuses_clients_without_credentials_or_with_wrong_ones(nats_server):
    url = natsauth.plain_url(nats_server.url)
    for user, password in ((None, None), ("gateway", "wrong"), ("nobody", "x")):
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await connect_as(url, user, password, [])
    nc = await connect_as(url, "gateway", nats_server.extra["gateway"], [])  # the right password gets in
    assert nc.is_connected
    await nc.close()


async def test_the_gateways_credentials_cannot_cut_ecash_create_keys_or_read_billings_replies(
    make_node, nats_server, client_wallet
):
    node = await make_node(CORE, **PRICES)
    url = natsauth.plain_url(nats_server.url)
    errors: list[str] = []
    gateway = await connect_as(url, "gateway", nats_server.extra["gateway"], errors)
    billing = await connect_as(url, "billing", nats_server.extra["billing"], [])
    try:
        await gateway.subscribe("_INBOX.billing.>")  # billing's replies carry tokens
        await gateway.subscribe(bus.WALLET_ISSUE)  # posing as the wallet
        for subject, message in (
            (bus.WALLET_ISSUE, bus.Issue(1000, "gateway-theft")),
            (bus.BILLING_CREATE_KEY, bus.CreateKey("f" * 64, 10**9, "gateway-gift")),
        ):
            with pytest.raises(messaging.BusError):  # dropped by the server: no answer ever comes
                await messaging.request(gateway, subject, message, bus.KeyInfo, timeout=1)
        await asyncio.sleep(0.2)
        violations = " ".join(errors).lower()  # nats-py lower-cases the server's -ERR
        for what in ('Subscription to "_INBOX.billing.>"', f'Subscription to "{bus.WALLET_ISSUE}"',
                     f'Publish to "{bus.WALLET_ISSUE}"', f'Publish to "{bus.BILLING_CREATE_KEY}"'):  # fmt: skip
            assert f"permissions violation for {what}".lower() in violations, errors
        # Billing, whose job it is, is answered by the wallet (it holds nothing yet).
        holdings = await messaging.request(billing, bus.WALLET_HOLDINGS, bus.HoldingsQuery(), bus.Holdings)
        assert holdings.unspent_msat == 0
        conn = await asyncpg.connect(node.settings.database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM billing.keys") == 0
            assert await conn.fetchval("SELECT count(*) FROM wallet.issues") == 0
        finally:
            await conn.close()
    finally:
        await gateway.close()
        await billing.close()


# ---- secrets at rest ----------------------------------------------------------------------------


async def rotate_command(database: str, keys: str) -> str:
    """`python -m shared.secretbox rotate` as an operator runs it; its first line, minus the key note."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.secretbox", "rotate", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "DATABASE_URL": database, "SECRETS_KEY": keys},
    )  # fmt: skip
    output = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
    assert process.returncode == 0, output
    return output.split(" with the first", 1)[0].strip()


async def test_secrets_key_rotation_and_sealing_of_old_plaintext(database):
    key_a, key_b = SECRETS_KEY, Fernet.generate_key().decode()
    pool = await db.create_pool(database, 1, 2)
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn, "wallet", WALLET_MIGRATIONS)
            await db.migrate(conn, "discovery", DISCOVERY_MIGRATIONS)
            mnemonic = await storage.load_seed(conn, SecretBox((key_a,)))
        nostr = (await stored_keys(pool, SecretBox((key_a,)))).secret_key().to_hex()
        async with pool.acquire() as conn:
            stored = await conn.fetchval("SELECT mnemonic FROM wallet.seed")
            assert is_sealed(stored) and mnemonic.split()[0] not in stored
            # Rotation as documented: the new key first, both known, `rotate`; then the old one can go.
            assert await rotate_command(database, f"{key_b},{key_a}") == "re-encrypted 2 stored secret(s)"
            assert await storage.load_seed(conn, SecretBox((key_b,))) == mnemonic
            assert await rotate(conn, SecretBox((key_b,))) == 2  # the function behind it, idempotent
            with pytest.raises(ConfigError, match="SECRETS_KEY"):
                await storage.load_seed(conn, SecretBox((key_a,)))
            # A seed stored in the clear by an older version is sealed at the next start.
            await conn.execute("UPDATE wallet.seed SET mnemonic = $1", mnemonic)
            assert await storage.load_seed(conn, SecretBox((key_b,))) == mnemonic
            assert is_sealed(await conn.fetchval("SELECT mnemonic FROM wallet.seed"))
        assert (await stored_keys(pool, SecretBox((key_b,)))).secret_key().to_hex() == nostr
    finally:
        await pool.close()
    with pytest.raises(ConfigError, match="SECRETS_KEY"):
        SecretBox(())
    with pytest.raises(ConfigError, match="SECRETS_KEY"):
        SecretBox(("not-a-key",))


async def test_after_the_money_path_no_secret_is_in_the_database_dump_or_any_log(
    nats_server, postgres, database, upstream, mint, client_wallet, http, tmp_path
):
    env = node_env(nats_server, database, upstream, mint.url, **PRICES, LOG_LEVEL="DEBUG")
    cluster = Cluster(env, tmp_path)
    try:
        procs = await cluster.start_all(("billing", "billing"), ("wallet", "wallet"), ("discovery", "discovery"))
        gateway = await cluster.start("gateway")
        base = gateway.url
        tokens = [await client_wallet.token(60), await client_wallet.token(20)]
        async with http.post(f"{base}/v1/balance/create", json={"initial_balance_token": tokens[0]}) as response:
            assert response.status == 200, await response.text()
            key = (await response.json())["api_key"]
        async with http.post(f"{base}{CHAT}", json=HELLO, headers=auth(key)) as response:
            assert response.status == 200, await response.text()
        async with http.post(f"{base}{CHAT}", json=HELLO, headers={"X-Cashu": tokens[1]}) as response:
            assert response.status == 200, await response.text()
            change = response.headers["X-Cashu"]
        await settled_balance(http, gateway, key)
        async with http.post(f"{base}/v1/balance/refund", headers=auth(key)) as response:
            assert response.status == 200, await response.text()
            refund = (await response.json())["token"]
        async with http.post(f"{base}/v2/lightning/invoice", json={"amount_sats": 5, "purpose": "create"}) as response:
            assert response.status == 200, await response.text()  # its new key waits, sealed, for the payer
        async with http.get(f"{procs[2].url}/readyz") as response:
            assert response.status == 200
    finally:
        await cluster.stop()
    pg_dump = await asyncio.create_subprocess_exec(PG_DUMP, "--data-only", f"--dbname={database}",
                                                   stdout=asyncio.subprocess.PIPE)  # fmt: skip
    dump = (await asyncio.wait_for(pg_dump.communicate(), 60))[0].decode()
    assert pg_dump.returncode == 0
    box = SecretBox((SECRETS_KEY,))
    sealed_seed = re.search(r"^t\t(gAAAAA\S+)", dump.split("COPY wallet.seed", 1)[1], re.M).group(1)
    mnemonic = box.open(sealed_seed)
    sealed_nostr = re.search(r"^t\t(gAAAAA\S+)", dump.split("COPY discovery.node_key", 1)[1], re.M).group(1)
    nostr = Keys.parse(box.open(sealed_nostr)).secret_key()
    secrets = {"mnemonic": mnemonic, "first seed words": " ".join(mnemonic.split()[:3]), "nsec": nostr.to_bech32(),
               "nostr hex": nostr.to_hex(), "api key": key, "refund token": refund, "change token": change,
               "upstream key": UPSTREAM_KEY,
               **{f"token {i}": token for i, token in enumerate(tokens)}}  # fmt: skip
    logs = {proc.name: proc.log() for proc in cluster.procs}
    logs["nats"] = nats_server.log_path.read_text(errors="replace")
    logs["postgres"] = postgres.log_path.read_text(errors="replace")
    assert len(mnemonic.split()) >= 12 and logs["wallet"] and logs["billing"]  # there was something to search
    for where, text in {"database dump": dump, **logs}.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in the {where}"
        for pattern in (r"cashu[AB][A-Za-z0-9_-]{20}", r"sk-[0-9a-f]{20}", r"nsec1[0-9a-z]{20}"):
            assert not re.search(pattern, text), f"{pattern} in the {where}"


# ---- calls out: Lightning addresses -------------------------------------------------------------

REFUSED = (
    "127.0.0.2", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "255.255.255.255", "240.0.0.1", "198.18.0.1", "fc00::1", "fd12:3456::1", "fe80::1", "ff02::1",
    "::", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "64:ff9b::a00:1", "2001:db8::1",
)  # fmt: skip


def stub_resolver(*answers: str):
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return list(answers)

    return resolve, asked


@pytest.mark.parametrize("address", REFUSED)
async def test_lnurl_refuses_a_host_resolving_to_a_non_public_address(address):
    resolve, asked = stub_resolver(address)
    with pytest.raises(LnurlError) as refused:
        await LnurlClient(resolve=resolve).fetch_invoice("alice@wallet.example", 1000)
    assert refused.value.bad_address and asked == ["wallet.example"]
    assert not public_address(address)


async def test_lnurl_address_check_passes_public_hosts_and_refuses_mixed_or_empty_answers():
    resolve, _ = stub_resolver("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946")
    assert await LnurlClient(resolve=resolve).check_host("wallet.example", 443)  # checked, never called
    for answers in (("93.184.216.34", "10.1.2.3"), ()):
        resolve, _ = stub_resolver(*answers)
        with pytest.raises(LnurlError) as refused:
            await LnurlClient(resolve=resolve).check_host("wallet.example", 443)
        assert refused.value.bad_address
    resolve, _ = stub_resolver("127.0.0.1")
    assert await LnurlClient(allow_loopback=True, resolve=resolve).check_host("localhost", 80) == ["127.0.0.1"]


async def test_lnurl_fetches_only_the_checked_addresses_and_checks_the_invoice(mint, http):
    """A named host (resolved by a stub to loopback, allowed for development) is called at exactly the
    addresses checked, its callback on the same host; an invoice of another amount is refused."""
    invoices: list[int] = []

    async def params(request: web.Request) -> web.Response:
        return web.json_response({"tag": "payRequest", "callback": f"http://lnurl.test:{port}/cb",
                                  "minSendable": 1000, "maxSendable": 10**9, "metadata": "[]"})  # fmt: skip

    async def callback(request: web.Request) -> web.Response:
        sats = int(request.query["amount"]) // 1000 + (1 if invoices else 0)  # the second one overcharges
        invoices.append(sats)
        async with http.post(f"{mint.url}/v1/mint/quote/bolt11", json={"amount": sats, "unit": "sat"}) as resp:
            return web.json_response({"pr": (await resp.json())["request"], "routes": []})

    app = web.Application()
    app.router.add_get("/.well-known/lnurlp/alice", params)
    app.router.add_get("/cb", callback)
    runner, url = await serve_app(app)
    port = int(url.rsplit(":", 1)[1])
    resolve, asked = stub_resolver("127.0.0.1")
    client = LnurlClient(allow_loopback=True, resolve=resolve)
    try:
        invoice = await client.fetch_invoice(f"alice@lnurl.test:{port}", 7000)
        assert invoice.startswith("ln") and asked == ["lnurl.test"]
        with pytest.raises(LnurlError, match="8000 msat instead of 7000") as refused:
            await client.fetch_invoice(f"alice@lnurl.test:{port}", 7000)
        assert not refused.value.bad_address and invoices == [7, 8]
    finally:
        await runner.cleanup()


async def test_lnurl_follows_no_redirect_and_reads_no_oversized_answer():
    listener = Listener()
    elsewhere = await listener.listen("127.0.0.2")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.2:{elsewhere}/.well-known/lnurlp/alice")

    async def huge(request: web.Request) -> web.Response:
        return web.json_response({"tag": "payRequest", "padding": "x" * (70 * 1024)})

    app = web.Application()
    app.router.add_get("/.well-known/lnurlp/alice", redirect)
    app.router.add_get("/.well-known/lnurlp/bob", huge)
    runner, url = await serve_app(app)
    port = int(url.rsplit(":", 1)[1])
    client = LnurlClient(allow_loopback=True)
    try:
        with pytest.raises(LnurlError, match="answered 302"):
            await client.fetch_invoice(f"alice@127.0.0.1:{port}", 1000)
        with pytest.raises(LnurlError, match="larger than 65536 bytes"):
            await client.fetch_invoice(f"bob@127.0.0.1:{port}", 1000)
        assert listener.connections == 0
    finally:
        listener.close()
        await runner.cleanup()


class Listener:
    """A TCP listener on a loopback address that counts connections (none must arrive)."""

    def __init__(self) -> None:
        self.connections = 0
        self.servers: list[asyncio.AbstractServer] = []

    async def listen(self, host: str) -> int:
        def accepted(reader, writer) -> None:
            self.connections += 1
            writer.close()

        server = await asyncio.start_server(accepted, host, 0)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    def close(self) -> None:
        for server in self.servers:
            server.close()


async def funded_by_ecash(http, node, client_wallet, sats: int) -> str:
    token = await client_wallet.token(sats)  # real ecash, so the wallet could pay out
    async with http.post(f"{node.url}/v1/balance/create", json={"initial_balance_token": token}) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["api_key"]


async def refund_to(http, node, key: str, address: str | None) -> tuple[int, dict]:
    body = {"lightning_address": address} if address else {}
    async with http.post(f"{node.url}/v1/balance/refund", json=body, headers=auth(key)) as response:
        return response.status, await response.json()


async def test_lightning_refunds_to_loopback_hosts_are_refused_before_any_connection(make_node, http, client_wallet):
    node = await make_node(CORE, **PRICES, LNURL_ALLOW_LOOPBACK="false")
    key = await funded_by_ecash(http, node, client_wallet, 50)
    await funded_by_ecash(http, node, client_wallet, 50)  # the wallet could pay, were the address allowed
    listener = Listener()
    try:
        addresses = [f"alice@127.0.0.2:{await listener.listen('127.0.0.2')}",
                     f"alice@localhost:{await listener.listen('127.0.0.1')}"]  # fmt: skip
        try:
            addresses.append(f"alice@[::1]:{await listener.listen('::1')}")
        except OSError:  # no IPv6 loopback here; the unit tests cover ::1
            pass
        for address in addresses:
            status, body = await refund_to(http, node, key, address)
            assert status == 400 and "not a public host" in body["detail"], (address, body)
        assert listener.connections == 0
    finally:
        listener.close()
    info = await settled_balance(http, node, key)
    assert info["balance"] == 50_000  # nothing debited
    status, body = await refund_to(http, node, key, None)  # the refund can go elsewhere
    assert status == 200 and body["msats"] == "50000" and body["token"].startswith("cashu")


async def test_an_lnurl_callback_on_another_host_is_refused_before_it_is_called(make_node, http, client_wallet):
    node = await make_node(CORE, **PRICES)  # loopback allowed (development), but only the address's own host
    key = await funded_by_ecash(http, node, client_wallet, 40)
    await funded_by_ecash(http, node, client_wallet, 40)
    listener = Listener()
    elsewhere = await listener.listen("127.0.0.2")

    async def params(request: web.Request) -> web.Response:
        return web.json_response({"tag": "payRequest", "callback": f"http://127.0.0.2:{elsewhere}/cb",
                                  "minSendable": 1000, "maxSendable": 10**9, "metadata": "[]"})  # fmt: skip

    app = web.Application()
    app.router.add_get("/.well-known/lnurlp/alice", params)
    runner, url = await serve_app(app)
    port = int(url.rsplit(":", 1)[1])
    try:
        status, body = await refund_to(http, node, key, f"alice@127.0.0.1:{port}")
        assert status == 400 and "callback" in body["detail"], body
        assert listener.connections == 0
    finally:
        listener.close()
        await runner.cleanup()
    assert (await settled_balance(http, node, key))["balance"] == 40_000


# ---- calls in: client addresses, limits, metrics ------------------------------------------------


async def statuses(http, url: str, headers_list: list[dict]) -> list[int]:
    result = []
    for headers in headers_list:
        async with http.get(f"{url}/v1/balance/info", headers=headers) as response:
            result.append(response.status)
    return result


async def test_forged_forwarded_for_from_an_untrusted_peer_does_not_escape_the_limit(make_node, http):
    node = await make_node(("billing", "gateway"), RATE_LIMIT_PER_MINUTE="3")
    forged = [{"X-Forwarded-For": f"203.0.113.{i}"} for i in range(6)]
    assert await statuses(http, node.url, forged) == [401, 401, 401, 429, 429, 429]


async def test_forwarded_for_from_a_trusted_proxy_identifies_the_client(make_node, http):
    node = await make_node(("billing", "gateway"), RATE_LIMIT_PER_MINUTE="3", TRUSTED_PROXIES="127.0.0.0/8")
    one = {"X-Forwarded-For": "198.51.100.1"}
    assert await statuses(http, node.url, [one, one, one, one]) == [401, 401, 401, 429]
    # A hop forged left of what the proxy saw changes nothing; another client has its own allowance.
    forged = {"X-Forwarded-For": "203.0.113.99, 198.51.100.1"}
    assert await statuses(http, node.url, [forged, {"X-Forwarded-For": "198.51.100.2"}]) == [429, 401]


async def test_one_key_is_limited_across_addresses(make_node, http):
    node = await make_node(("billing", "gateway"), RATE_LIMIT_PER_KEY_PER_MINUTE="2", TRUSTED_PROXIES="127.0.0.1")
    key, other = "sk-" + "1" * 64, "sk-" + "2" * 64
    spread = [{**auth(key), "X-Forwarded-For": f"198.51.100.{i}"} for i in range(3)]
    assert await statuses(http, node.url, spread) == [401, 401, 429]
    async with http.get(f"{node.url}/v1/balance/info", headers=auth(key)) as response:
        assert "this key" in (await response.json())["detail"]
    assert await statuses(http, node.url, [auth(other)]) == [401]


async def test_gateway_metrics_are_off_the_public_port_and_model_labels_are_bounded(make_node, http):
    node = await make_node(("billing", "gateway"), **PRICES)
    key = await funded_key(node.settings.nats_url, 100_000)
    invented = "invented-model-" + hashlib.sha256(b"x").hexdigest()[:8]
    async with http.post(f"{node.url}{CHAT}", json={**HELLO, "model": invented}, headers=auth(key)) as response:
        assert response.status == 200, await response.text()
    async with http.get(f"{node.url}/metrics") as response:
        assert response.status == 404
    async with http.get(f"{node.urls['gateway_metrics']}/metrics") as response:
        text = await response.text()
    assert invented not in text
    assert re.search(r'routstr_http_requests_total\{[^}]*model="unknown"[^}]*status="200"', text), text


def test_the_example_nats_deployment_carries_the_bus_permission_table():
    values = yaml.safe_load((ROOT / "deploy" / "examples" / "nats-values.yaml").read_text())
    users = {u["user"]: u for u in values["config"]["merge"]["authorization"]["users"]}
    assert set(users) == set(bus.ROLES)
    for role, user in users.items():
        assert user["permissions"] == bus.nats_permissions(role), f"regenerate {role}'s permissions"
        variable = f"NATS_{role.upper()}_PASSWORD"
        assert user["password"] == f"<< ${variable} >>"
        assert values["container"]["env"][variable]["valueFrom"]["secretKeyRef"]["key"] == role


def test_tls_to_nats_and_postgres_is_configured_by_settings(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "routstr test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256())
    )  # fmt: skip
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    plain = load_settings({"NATS_URL": "nats://127.0.0.1:4222"}, dotenv=None)
    assert tls.nats_context(plain) is None and tls.database_context(plain) is None
    configured = load_settings({"NATS_URL": "nats://127.0.0.1:4222", "NATS_CA_FILE": str(ca),
                                "DATABASE_CA_FILE": str(ca)}, dotenv=None)  # fmt: skip
    for context in (tls.nats_context(configured), tls.database_context(configured)):
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "routstr test CA"),),)]
    with pytest.raises(ConfigError, match="NATS_CA_FILE"):
        load_settings({"NATS_CA_FILE": str(tmp_path / "missing.pem")}, dotenv=None)
