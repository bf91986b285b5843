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

# python-engineio 4.15.1 caches a packet's encoding whatever the transport
# asked for, and a broadcast shares its packets between clients: a binary
# packet encoded first for a WebSocket client (bytes) then breaks the
# long-polling payload of the next ("can only concatenate str (not
# bytes)"), with any manager, Redis's too. Not sticky's doing; worked
# around here by encoding each time.
import engineio.packet  # noqa: E402

_encode = engineio.packet.Packet.encode


def _encode_per_transport(self, b64=False):
    self.encode_cache = None
    return _encode(self, b64=b64)


engineio.packet.Packet.encode = _encode_per_transport

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
