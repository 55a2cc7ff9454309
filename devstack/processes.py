"""Start real NATS, Postgres and a nutshell mint on free loopback ports, for `make run` and the tests.

Each starter returns a `Service` with its URL and a `stop()`. Nothing here is used in production:
there, NATS, Postgres and the mints are the operator's.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from shared import bus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    """True when nothing listens on loopback `port` (connections of an earlier run in TIME_WAIT do not count,
    as a server binding with SO_REUSEADDR, as uvicorn does, ignores them too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    # Each runs in a session of its own (start_new_session), so a Ctrl-C at the terminal reaches only its
    # owner, which stops it here after the services that use it have drained (NATS) and finished (Postgres).
    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait(name: str, proc: subprocess.Popen, log_path: Path, ready: Callable[[], bool], timeout: float) -> None:
    """Wait until `ready()`; on failure or an interrupt (Ctrl-C reaches only us) the process is killed."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; log: {log_path}\n{_tail(log_path)}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{name} not ready after {timeout:g}s; log: {log_path}\n{_tail(log_path)}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return response.status == 200


def _binary(name: str) -> str:
    """A binary from this virtualenv's bin/ (pip-installed) first, then the system PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install the project (`make install`)")
    return found


def nats_passwords() -> dict[str, str]:
    """A fresh random password for every bus role (`shared.bus.ROLES`)."""
    return {role: secrets.token_urlsafe(24) for role in bus.ROLES}


def start_nats(
    workdir: Path, passwords: dict[str, str], unrestricted: dict[str, str] | None = None, port: int | None = None
) -> Service:
    """nats-server with JetStream (stored under `workdir`, on `port` or a free one) and the bus's users and
    permissions (`bus.nats_authorization`); ready when its monitor says JetStream is up. `passwords` holds each
    role's password; the config file is 0600. Started again on the same folder and port, it carries on with
    the same streams."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, monitor = port or free_port(), free_port()
    log_path = workdir / "nats.log"
    config = workdir / "nats.conf"
    config.touch(mode=0o600)
    config.write_text(
        f'listen: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{monitor}"\n'
        f"jetstream {{ store_dir: {json.dumps(str(workdir / 'js'))} }}\n"
        + bus.nats_authorization(passwords, unrestricted)
    )
    proc = subprocess.Popen(
        [_binary("nats-server"), "-c", str(config)],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _wait("nats", proc, log_path, lambda: _http_ok(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"), 15)
    return Service("nats", f"nats://127.0.0.1:{port}", proc, log_path, dict(passwords))


def _postgres_bin() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL server binaries not found: `make install` installs Debian's postgresql")


def _as_postgres_user() -> dict:
    """PostgreSQL refuses to run as root; drop to the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid}


def start_postgres(
    workdir: Path, with_password: bool = False, durable: bool = False, port: int | None = None
) -> Service:
    """A cluster owned by an unprivileged user, on loopback only: throwaway (fsync off) unless `durable`, which a
    node taking real ecash needs (a crash must not lose a committed ledger row).

    Trust auth, or with `with_password` SCRAM for everyone, the superuser's password made once and
    kept in `workdir/superuser.password` (0600). A cluster made without one is refused then."""
    bindir = _postgres_bin()
    workdir = workdir.resolve()  # the postgres user needs every absolute parent to be traversable
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    creds = _as_postgres_user()
    if creds:
        for path in (workdir, *workdir.parents):
            if path == Path("/"):
                break
            os.chmod(path, os.stat(path).st_mode | 0o011)  # traversable by the postgres user
        os.chown(workdir, creds["user"], creds["group"])
    log_path = workdir / "postgres.log"
    secret_file = workdir / "superuser.password"
    auth = ["--auth=trust"]
    if with_password and not secret_file.exists():
        if (data / "PG_VERSION").exists():
            raise RuntimeError(f"{data} was made without a password; remove it (`make clean`) to start afresh")
        secret_file.touch(mode=0o600)
        secret_file.write_text(secrets.token_urlsafe(24))
    if with_password:
        pwfile = workdir / "initdb.pw"
        pwfile.touch(mode=0o600)
        pwfile.write_text(secret_file.read_text())
        if creds:
            os.chown(pwfile, creds["user"], creds["group"])
        auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
    if not (data / "PG_VERSION").exists():
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", *auth, "-E", "UTF8",
             *([] if durable else ["--no-sync"])],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **creds,
        )  # fmt: skip
    if with_password:
        pwfile.unlink()
    port = port or free_port()
    fast = [] if durable else ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    proc = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(workdir),
         "-c", "listen_addresses=127.0.0.1", *fast, "-c", "max_connections=300"],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, **creds,
    )  # fmt: skip

    def ready() -> bool:
        probe = subprocess.run(
            [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
            capture_output=True,
        )
        return probe.returncode == 0

    _wait("postgres", proc, log_path, ready, 30)
    user = f"postgres:{quote(secret_file.read_text(), safe='')}" if with_password else "postgres"
    return Service("postgres", f"postgresql://{user}@127.0.0.1:{port}/postgres", proc, log_path)


def start_mint(workdir: Path, input_fee_ppk: int = 0, port: int | None = None, **mint_env: str) -> Service:
    """The nutshell mint with its FakeWallet Lightning backend (invoices pay themselves), on `port` (a free
    one when None); `mint_env` adds nutshell settings (e.g. MINT_DERIVATION_PATH to rotate its keyset)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINT_", "CASHU_", "FAKEWALLET_", "TOR"))}
    env.update(
        MINT_BACKEND_BOLT11_SAT="FakeWallet",
        MINT_LISTEN_HOST="127.0.0.1",
        MINT_LISTEN_PORT=str(port),
        MINT_PRIVATE_KEY=f"routstr-dev-mint-{input_fee_ppk}",
        MINT_DATABASE=str(workdir / "db"),
        MINT_INPUT_FEE_PPK=str(input_fee_ppk),
        MINT_RATE_LIMIT="false",
        FAKEWALLET_DELAY_INCOMING_PAYMENT="0",
        FAKEWALLET_DELAY_OUTGOING_PAYMENT="0",
        FAKEWALLET_BRR="true",
        TOR="false",
        DEBUG="false",
    )
    env.update(mint_env)
    log_path = workdir / "mint.log"
    # The mint reads `.env` from its working directory, so it gets a folder of its own.
    proc = subprocess.Popen(
        [sys.executable, "-m", "cashu.mint"], cwd=workdir, env=env,
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait("mint", proc, log_path, lambda: _http_ok(f"{url}/v1/keysets"), 60)
    return Service("mint", url, proc, log_path)
