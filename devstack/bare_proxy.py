"""The bench's baseline: a bare aiohttp reverse proxy (no auth, no billing, no metering), streaming
the upstream's answer through chunk by chunk. `python -m devstack.bare_proxy --port P --upstream URL`."""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

_DROP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}
SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_app(upstream: str, api_key: str) -> web.Application:
    async def session_ctx(app: web.Application):
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60))
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        headers["Authorization"] = f"Bearer {api_key}"
        url = upstream + request.path.removeprefix("/v1")
        async with request.app[SESSION].request(request.method, url, data=await request.read(), headers=headers) as up:
            if up.content_type != "text/event-stream":
                return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)
            response = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="upstream base URL ending in /v1")
    parser.add_argument("--api-key", default="bench")
    args = parser.parse_args()
    uvloop.install()
    web.run_app(create_app(args.upstream, args.api_key), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
