#!/usr/bin/env python3
"""A python-socketio worker with no sticky code at all (aiohttp server).

It only takes the listening socket sticky hands over (fd 3, socket
activation) and serves Socket.IO on it with aiohttp's standard runner
(plain_aiohttp.py): no registration, no ``Connection: close``. With
``sticky run --learn on`` (the default) the kernel learns its sessions from
the handshake answers (e2e/test/learning.test.js). Same events as
python_worker.py.

Known limit, not sticky's: python-engineio 4.15.1's aiohttp driver reads a
long-polling POST body with one ``read(CONTENT_LENGTH)``, which truncates
bodies larger than what has arrived at that moment (hundreds of KiB). The
sticky integration works around it; this plain worker does not, so the
tests send it small messages only.

Needs the packages of e2e/requirements.txt.
"""

import asyncio
import os

import socketio
from aiohttp import web

import plain_aiohttp  # e2e/workers/plain_aiohttp.py: fd 3 or $PORT, no sticky code

IDENTITY = {"worker": int(os.environ.get("STICKY_WORKER", "0")), "pid": os.getpid(), "lang": "python"}

sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*", always_connect=True)
app = web.Application()
sio.attach(app)


@sio.event
async def connect(sid, environ, auth=None):
    await sio.emit("hello", IDENTITY, to=sid)


@sio.event
async def echo(sid, payload):
    return payload


@sio.event
async def whoami(sid, *args):
    return IDENTITY


if __name__ == "__main__":
    asyncio.run(plain_aiohttp.serve(app))
