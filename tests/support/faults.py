"""Fault injection with real parts: a reverse proxy in front of a real mint that loses chosen answers
(after the mint acted on the request, as a proxy timing out does), and signals to a whole process tree
(Postgres serves each connection from a child process, so pausing only its postmaster pauses nothing)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import serve_app


class LossyMintProxy:
    """`url` forwards every call to the mint; `lose[path] = [False, True]` passes the next answer on `path`
    and turns the one after into a 502 although the mint executed the request (its answer is lost)."""

    def __init__(self, mint_url: str):
        self.mint_url = mint_url
        self.lose: dict[str, list[bool]] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> LossyMintProxy:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner, self.url = await serve_app(app)
        return self

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with self._session.request(
            request.method, f"{self.mint_url}{request.path_qs}", data=body or None, headers=headers
        ) as response:
            data, status = await response.read(), response.status
        if self.lose.get(request.path) and self.lose[request.path].pop(0):
            return web.Response(status=502, text="upstream answer lost")
        return web.Response(body=data, status=status, content_type="application/json")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue.extend(children.get(current, []))
    return tree


def signal_tree(pid: int, sig: signal.Signals) -> None:
    """Send `sig` (SIGSTOP, SIGCONT, SIGKILL) to a process and every descendant."""
    for member in process_tree(pid):
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass
