#!/usr/bin/env python3
"""python-socketio worker of the broadcast tests (test/cluster.test.js):
the events of cluster-app.js that python-socketio offers across servers
(hello, join, shout, shout-room; it has no fetchSockets or serverSideEmit).

MANAGER=relay: sticky_relay.RelayManager (sticky's relay socket);
MANAGER=redis: socketio.AsyncRedisManager on $REDIS_URL.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "integrations", "python"))

import socketio  # noqa: E402

import sticky_relay  # noqa: E402
import sticky_socketio  # noqa: E402

ME = {"worker": int(os.environ.get("STICKY_WORKER", "0")), "pid": os.getpid()}

if os.environ.get("MANAGER") == "redis":
    manager = socketio.AsyncRedisManager(os.environ["REDIS_URL"])
else:
    manager = sticky_relay.RelayManager()

sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*",
                           client_manager=manager, always_connect=True)
sticky_socketio.attach(sio)


@sio.event
async def connect(sid, environ, auth=None):
    await sio.emit("hello", ME, to=sid)


@sio.event
async def join(sid, room):
    await sio.enter_room(sid, room)
    return ME


@sio.event
async def shout(sid, payload):
    await sio.emit("shout", payload)
    return ME


@sio.on("shout-room")
async def shout_room(sid, room, payload):
    await sio.emit("shout-room", payload, room=room)
    return ME


if __name__ == "__main__":
    sticky_socketio.run(sio)
