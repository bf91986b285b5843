#!/usr/bin/env python3
"""Socket.IO 4 worker for the e2e suite (python-socketio + aiohttp).

Contract (shared with the Node and Rust workers):
- listens on the inherited fd 3 under sticky (LISTEN_FDS=1, LISTEN_PID=pid),
  else on 127.0.0.1:$PORT (default 3000);
- Socket.IO at /socket.io/, CORS for any origin, 2 MB+ payloads;
- on connection emits `hello` {worker, pid, lang: "python"};
- `echo` acks its arguments back unchanged (binary included);
- `whoami` acks {worker, pid, lang};
- every Engine.IO session is registered with sticky ($STICKY_CONTROL) before
  its handshake answer leaves; long-polling answers carry Connection: close.

Needs the packages of e2e/requirements.txt.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "integrations", "python"))

import socketio  # noqa: E402

import sticky_socketio  # noqa: E402

WORKER = int(os.environ.get("STICKY_WORKER", "0"))
IDENTITY = {"worker": WORKER, "pid": os.getpid(), "lang": "python"}

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "WARNING").upper(),
    format=f"[python worker {WORKER} pid {os.getpid()}] %(levelname)s %(name)s: %(message)s",
)

sio = socketio.AsyncServer(
    async_mode="aiohttp",
    cors_allowed_origins="*",
    max_http_buffer_size=10_000_000,
    # send the CONNECT answer before the connect handler runs, so `hello`
    # follows it on the wire
    always_connect=True,
)
sticky_socketio.attach(sio)


@sio.event
async def connect(sid, environ, auth=None):
    await sio.emit("hello", IDENTITY, to=sid)


@sio.event
async def echo(sid, *args):
    # one argument comes back as one argument, several as several
    if len(args) == 1:
        return args[0]
    return args


@sio.event
async def whoami(sid, *args):
    return IDENTITY


if __name__ == "__main__":
    sticky_socketio.run(sio)
