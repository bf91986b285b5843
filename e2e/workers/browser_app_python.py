#!/usr/bin/env python3
"""The browser test app, Python: an ordinary python-socketio app (aiohttp)
whose worker serves its own page, script, stylesheet and JSON API (aiohttp's
keep-alive default), e2e/test/browser.test.js. ``hello`` {worker, pid} on
connection; ``echo`` acks {pid, payload}.

APP_STICKY=integration uses integrations/python as its README says;
otherwise (plain) the app has no sticky code and only listens on fd 3.
"""

import asyncio
import os
import sys
import time

import socketio
from aiohttp import web

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE_DIR = os.environ.get("APP_PAGE_DIR", os.path.join(HERE, "..", "browser-app"))
CLIENT_JS = os.environ.get(
    "APP_CLIENT_JS", os.path.join(HERE, "..", "node_modules", "socket.io-client", "dist", "socket.io.min.js"))
INTEGRATION = os.environ.get("APP_STICKY") == "integration"
ME = {"worker": int(os.environ.get("STICKY_WORKER", "0")), "pid": os.getpid(), "lang": "python"}

sio = socketio.AsyncServer(async_mode="aiohttp", always_connect=True)
app = web.Application()
sio.attach(app)


def static(name, content_type):
    with open(name, "rb") as f:
        body = f.read()

    async def handler(request):
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-store"})
    return handler


async def ping(request):
    # What a front proxy says the client's address is (X-Forwarded-For).
    body = {**ME, "forwardedFor": request.headers.get("X-Forwarded-For"), "at": int(time.time() * 1000)}
    return web.json_response(body, headers={"Cache-Control": "no-store"})


app.router.add_get("/", static(os.path.join(PAGE_DIR, "index.html"), "text/html"))
app.router.add_get("/app.js", static(os.path.join(PAGE_DIR, "app.js"), "text/javascript"))
app.router.add_get("/app.css", static(os.path.join(PAGE_DIR, "app.css"), "text/css"))
app.router.add_get("/client.js", static(CLIENT_JS, "text/javascript"))
app.router.add_get("/api/ping", ping)


@sio.event
async def connect(sid, environ, auth=None):
    await sio.emit("hello", ME, to=sid)


@sio.event
async def echo(sid, payload):
    return {"pid": ME["pid"], "payload": payload}


if __name__ == "__main__":
    if INTEGRATION:
        sys.path.insert(0, os.path.join(HERE, "..", "..", "integrations", "python"))
        import sticky_socketio
        sticky_socketio.attach(sio)
        sticky_socketio.run(app)
    else:
        import plain_aiohttp  # e2e/workers/plain_aiohttp.py: fd 3 or $PORT
        asyncio.run(plain_aiohttp.serve(app))
