"""Broadcasting between python-socketio workers through sticky's relay.

    import socketio, sticky_relay
    sio = socketio.AsyncServer(client_manager=sticky_relay.RelayManager())

`RelayManager` is an `AsyncPubSubManager` (like `AsyncRedisManager`) whose
pub/sub is the relay socket sticky gives every worker (`$STICKY_RELAY`): no
extra server on one machine. Messages are JSON texts, as with Redis.

Wire protocol (README, "Broadcasting between workers"): frames of a 4-byte
big-endian length and an op byte; `s` + channel subscribes, `p` + u16
channel length + channel + payload publishes, sticky sends `m` frames laid
out like `p`. A lost connection (sticky restarted, or a new sticky adopted
this worker) is retried every `retry` seconds and resubscribed; what is
published meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Optional

from socketio.async_pubsub_manager import AsyncPubSubManager


def _frame(op: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 1 + len(body)) + op + body


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    body = await reader.readexactly(n)
    return body[:1], body[1:]


class RelayManager(AsyncPubSubManager):
    """python-socketio client manager over sticky's relay socket.

    :param path: the relay socket; default `$STICKY_RELAY`.
    :param channel: the pub/sub channel (servers sharing it broadcast to
        each other), like `AsyncRedisManager`'s.
    :param retry: seconds between reconnection attempts.
    """

    name = "sticky"

    def __init__(self, path: Optional[str] = None, channel: str = "socketio",
                 write_only: bool = False, logger=None, json=None,
                 retry: float = 0.5):
        path = path or os.environ.get("STICKY_RELAY")
        if not path:
            raise RuntimeError(
                "RelayManager: no relay socket: run under `sticky run` "
                "(it sets STICKY_RELAY) or pass path=")
        super().__init__(channel=channel, write_only=write_only,
                         logger=logger, json=json)
        self.path = path
        self.retry = retry
        self._channel = channel.encode()
        self._publisher: Optional[asyncio.StreamWriter] = None
        self._publish_lock = asyncio.Lock()

    async def _connect(self):
        reader, writer = await asyncio.open_unix_connection(self.path)
        return reader, writer

    async def _publish(self, data):
        payload = self.json.dumps(data).encode()
        frame = _frame(b"p", struct.pack(">H", len(self._channel))
                       + self._channel + payload)
        async with self._publish_lock:
            for attempt in range(2):
                try:
                    if self._publisher is None or self._publisher.is_closing():
                        _, self._publisher = await self._connect()
                    self._publisher.write(frame)
                    await self._publisher.drain()
                    return
                except OSError as exc:
                    self._publisher = None
                    if attempt == 1:
                        self._get_logger().warning(
                            "sticky relay %s: cannot publish (%s); message lost",
                            self.path, exc)

    async def _listen(self):
        announced = False
        while True:
            try:
                reader, writer = await self._connect()
            except OSError as exc:
                if not announced:
                    announced = True
                    self._get_logger().warning(
                        "sticky relay %s unreachable (%s); retrying every %ss",
                        self.path, exc, self.retry)
                await asyncio.sleep(self.retry)
                continue
            if announced:
                self._get_logger().warning("sticky relay %s reached again", self.path)
                announced = False
            try:
                writer.write(_frame(b"s", self._channel))
                await writer.drain()
                while True:
                    op, body = await _read_frame(reader)
                    if op == b"m":
                        (n,) = struct.unpack(">H", body[:2])
                        yield body[2 + n:]
                    elif op == b"e":
                        raise OSError(body.decode(errors="replace"))
            except (OSError, asyncio.IncompleteReadError) as exc:
                self._get_logger().warning(
                    "sticky relay %s: connection lost (%s); reconnecting",
                    self.path, exc or "closed")
                writer.close()
                await asyncio.sleep(self.retry)
