"""Tests for sticky_socketio, runnable with the standard library runner:

    cd integrations/python && python3 -m unittest -v

The control client is tested against a fake sticky control server (a unix
stream socket speaking the line protocol). The Engine.IO hook and the
socket-activated worker tests need the packages of e2e/requirements.txt and
are skipped without them.
"""

import asyncio
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sticky_socketio  # noqa: E402

# the expected failures of these tests would be logged as errors
logging.getLogger("sticky_socketio").setLevel(logging.CRITICAL)
from sticky_socketio import ControlClient, StickyError  # noqa: E402

try:
    import aiohttp  # noqa: F401
    import engineio  # noqa: F401
    import socketio  # noqa: F401
    HAVE_SERVER_DEPS = True
except ImportError:  # pragma: no cover
    HAVE_SERVER_DEPS = False

WORKER = os.path.join(HERE, "..", "..", "e2e", "workers", "python_worker.py")


class FakeSticky:
    """Fake control socket. ``respond(conn_index, line)`` returns the reply
    (without newline), ``None`` for no reply, or ``"DROP"`` to close the
    connection without answering."""

    def __init__(self, path, respond=None, delay=0.0):
        self.path = path
        self.respond = respond or (lambda idx, line: "ok")
        self.delay = delay
        self.lines = []  # (connection index, line, time)
        self.answered = {}  # line -> time its answer was written
        self.conns = 0
        self.server = None
        self._writers = []

    async def start(self):
        self.server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def stop(self):
        for w in self._writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer):
        self.conns += 1
        idx = self.conns
        self._writers.append(writer)
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    break
                line = raw.decode().rstrip("\n")
                self.lines.append((idx, line, time.monotonic()))
                reply = self.respond(idx, line)
                if reply == "DROP":
                    break
                if reply is None:
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(reply.encode() + b"\n")
                await writer.drain()
                self.answered[line] = time.monotonic()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def sent(self):
        return [line for _, line, _ in self.lines]


class TempDirCase(unittest.IsolatedAsyncioTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="sticky-py-")
        self.path = os.path.join(self.dir, "control.sock")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class ControlClientTest(TempDirCase):
    async def test_open_close_lines(self):
        fake = await FakeSticky(self.path).start()
        c = ControlClient(self.path)
        await c.open("abcDEF123_-")
        await c.close("abcDEF123_-")
        self.assertEqual(fake.sent(), ["open abcDEF123_-", "close abcDEF123_-"])
        self.assertEqual(c.connects, 1)
        await c.aclose()
        await fake.stop()

    async def test_persistent_connection_and_pipelining(self):
        # answers echo the request so that mismatched replies would show
        fake = await FakeSticky(self.path, lambda i, line: "ok " + line.split()[1]).start()
        c = ControlClient(self.path)
        sids = [f"s{i}" for i in range(200)]
        replies = await asyncio.gather(*(c.request(f"open {s}") for s in sids))
        self.assertEqual(replies, [f"ok {s}" for s in sids])
        self.assertEqual(c.connects, 1)
        self.assertEqual(fake.conns, 1)
        await c.aclose()
        await fake.stop()

    async def test_err_raises_with_reason(self):
        fake = await FakeSticky(
            self.path, lambda i, line: "err sid owned by another worker").start()
        c = ControlClient(self.path)
        with self.assertRaises(StickyError) as cm:
            await c.open("x")
        self.assertEqual(str(cm.exception), "sid owned by another worker")
        self.assertEqual(fake.sent(), ["open x"])  # not retried
        await c.aclose()
        await fake.stop()

    async def test_stats_parsed(self):
        fake = await FakeSticky(
            self.path, lambda i, line: "ok sessions=2 live_workers=3").start()
        c = ControlClient(self.path)
        self.assertEqual(await c.stats(), {"sessions": "2", "live_workers": "3"})
        await c.aclose()
        await fake.stop()

    async def test_reconnects_when_connection_drops(self):
        # the first connection dies on its first line without answering
        fake = await FakeSticky(
            self.path, lambda i, line: "DROP" if i == 1 else "ok").start()
        c = ControlClient(self.path, backoff=0.01)
        await c.open("a")
        self.assertEqual(fake.sent(), ["open a", "open a"])
        self.assertEqual(c.connects, 2)
        # and keeps using the new connection
        await c.open("b")
        self.assertEqual(c.connects, 2)
        await c.aclose()
        await fake.stop()

    async def test_reconnects_after_server_closes_idle_connection(self):
        fake = await FakeSticky(self.path).start()
        c = ControlClient(self.path, backoff=0.01)
        await c.open("a")
        for w in fake._writers:  # sticky restarted the connection
            w.close()
        await asyncio.sleep(0.05)
        await c.open("b")
        self.assertEqual(c.connects, 2)
        self.assertEqual(fake.sent(), ["open a", "open b"])
        await c.aclose()
        await fake.stop()

    async def test_reconnect_requested_by_sticky(self):
        fake = await FakeSticky(
            self.path,
            lambda i, line: "err worker restarted; reconnect" if i == 1 else "ok").start()
        c = ControlClient(self.path, backoff=0.01)
        await c.open("a")
        self.assertEqual(c.connects, 2)
        self.assertEqual([(i, l) for i, l, _ in fake.lines], [(1, "open a"), (2, "open a")])
        await c.aclose()
        await fake.stop()

    async def test_control_socket_comes_back(self):
        c = ControlClient(self.path, backoff=0.05, attempts=6)

        async def start_late():
            await asyncio.sleep(0.2)
            return await FakeSticky(self.path).start()

        task = asyncio.ensure_future(start_late())
        await c.open("late")
        fake = await task
        self.assertEqual(fake.sent(), ["open late"])
        await c.aclose()
        await fake.stop()

    async def test_unreachable_raises(self):
        c = ControlClient(self.path, attempts=2, backoff=0.01)
        with self.assertRaises(OSError):
            await c.open("a")

    async def test_no_answer_times_out_and_resyncs(self):
        fake = await FakeSticky(
            self.path, lambda i, line: None if i == 1 else "ok").start()
        c = ControlClient(self.path, timeout=0.2, attempts=2, backoff=0.01)
        t0 = time.monotonic()
        await c.open("a")  # first connection never answers: a new one does
        self.assertGreaterEqual(time.monotonic() - t0, 0.2)
        self.assertEqual(c.connects, 2)
        await c.aclose()
        await fake.stop()

    async def test_rejects_bad_lines(self):
        c = ControlClient(self.path)
        with self.assertRaises(ValueError):
            await c.request("open a\nclose b")
        with self.assertRaises(ValueError):
            await c.request("open " + "a" * 2000)

    async def test_close_soon_and_flush(self):
        fake = await FakeSticky(self.path).start()
        c = ControlClient(self.path)
        for i in range(5):
            c.close_soon(f"s{i}")
        await c.flush()
        self.assertEqual(sorted(fake.sent()), [f"close s{i}" for i in range(5)])
        await c.aclose()
        await fake.stop()


class ListenSocketTest(unittest.TestCase):
    def test_not_activated(self):
        env = dict(os.environ)
        try:
            os.environ.pop("LISTEN_FDS", None)
            self.assertIsNone(sticky_socketio.listen_socket())
            os.environ["LISTEN_FDS"] = "1"
            os.environ["LISTEN_PID"] = str(os.getpid() + 1)  # someone else's
            self.assertIsNone(sticky_socketio.listen_socket())
        finally:
            os.environ.clear()
            os.environ.update(env)


def _http_get(host, port, target, method="GET", body=b""):
    """Minimal HTTP/1.1 client returning (status, headers dict, body)."""
    async def go():
        reader, writer = await asyncio.open_connection(host, port)
        req = (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
               f"Content-Length: {len(body)}\r\nContent-Type: text/plain\r\n\r\n")
        writer.write(req.encode() + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for h in lines[1:]:
            if h:
                k, _, v = h.partition(":")
                headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        data = await reader.readexactly(n)
        # the server must close the connection (Connection: close)
        rest = await asyncio.wait_for(reader.read(), 2)
        writer.close()
        return status, headers, data, rest
    return go()


@unittest.skipUnless(HAVE_SERVER_DEPS, "python-socketio/aiohttp not installed")
class HookTest(TempDirCase):
    async def asyncSetUp(self):
        import socketio as sio_mod
        self.fake = await FakeSticky(self.path, delay=0.3).start()
        self.sio = sio_mod.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*")
        self.hook = sticky_socketio.attach(self.sio, control_path=self.path)
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.task = asyncio.ensure_future(sticky_socketio.serve(
            self.sio, port=self.port, ready=self.ready, stop=self.stop))
        await asyncio.wait_for(self.ready.wait(), 5)

    async def asyncTearDown(self):
        self.stop.set()
        await self.task
        await self.fake.stop()

    async def test_attach_is_idempotent(self):
        self.assertIs(sticky_socketio.attach(self.sio), self.hook)

    async def test_registered_before_handshake_answer(self):
        t0 = time.monotonic()
        status, headers, body, _ = await _http_get(
            "127.0.0.1", self.port, "/socket.io/?EIO=4&transport=polling")
        t1 = time.monotonic()
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("connection"), "close")
        sid = json.loads(body.decode()[1:])["sid"]
        self.assertEqual(self.fake.sent(), [f"open {sid}"])
        # the answer to `open` (delayed 0.3 s) was written before the
        # handshake response arrived
        self.assertGreaterEqual(t1 - t0, 0.3)
        self.assertLessEqual(self.fake.answered[f"open {sid}"], t1)
        self.assertEqual(self.hook.sessions, {sid})

        # Socket.IO connect, then close the Engine.IO session
        q = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
        status, headers, body, _ = await _http_get(
            "127.0.0.1", self.port, q, "POST", b"40")
        self.assertEqual((status, body, headers.get("connection")), (200, b"OK", "close"))
        status, _, body, _ = await _http_get("127.0.0.1", self.port, q)
        self.assertTrue(body.startswith(b"40{"), body)
        status, _, body, _ = await _http_get("127.0.0.1", self.port, q, "POST", b"1")
        self.assertEqual(status, 200)
        for _ in range(100):
            if f"close {sid}" in self.fake.answered:
                break
            await asyncio.sleep(0.02)
        self.assertEqual(self.fake.sent(), [f"open {sid}", f"close {sid}"])
        self.assertEqual(self.hook.sessions, set())

    async def test_error_responses_close_too(self):
        status, headers, body, _ = await _http_get(
            "127.0.0.1", self.port, "/socket.io/?EIO=4&transport=polling&sid=nope")
        self.assertEqual(status, 400)
        self.assertEqual(headers.get("connection"), "close")

    async def test_refused_registration_is_503(self):
        self.fake.respond = lambda i, line: "err session table full"
        status, headers, body, _ = await _http_get(
            "127.0.0.1", self.port, "/socket.io/?EIO=4&transport=polling")
        self.assertEqual(status, 503)
        self.assertEqual(self.sio.eio.sockets, {})

    async def test_large_polling_post(self):
        # 3 MB message over long-polling (python-engineio/aiohttp truncation)
        self.sio.eio.max_http_buffer_size = 5_000_000
        got = asyncio.get_running_loop().create_future()

        @self.sio.on("big")
        async def big(sid, data):
            got.set_result(data)

        _, _, body, _ = await _http_get(
            "127.0.0.1", self.port, "/socket.io/?EIO=4&transport=polling")
        sid = json.loads(body.decode()[1:])["sid"]
        q = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
        await _http_get("127.0.0.1", self.port, q, "POST", b"40")
        await _http_get("127.0.0.1", self.port, q)
        payload = "y" * 3_000_000
        status, _, body, _ = await _http_get(
            "127.0.0.1", self.port, q, "POST", ("42" + json.dumps(["big", payload])).encode())
        self.assertEqual(status, 200)
        self.assertEqual(await asyncio.wait_for(got, 5), payload)


@unittest.skipUnless(HAVE_SERVER_DEPS, "python-socketio/aiohttp not installed")
class ActivatedWorkerTest(TempDirCase):
    """The e2e worker, started with a listening socket as fd 3 the way sticky
    starts it (LISTEN_FDS=1, LISTEN_PID=its pid, STICKY_WORKER, STICKY_CONTROL)."""

    async def test_worker_on_fd3(self):
        fake = await FakeSticky(self.path).start()
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(64)
        port = lsock.getsockname()[1]
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="sticky",
                   STICKY_WORKER="7", STICKY_CONTROL=self.path)
        fd = lsock.fileno()
        # `exec` keeps the shell's pid, so $$ is the worker's pid
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", f'exec 3<&{fd}; LISTEN_PID=$$ exec "$0" "$1"',
            sys.executable, WORKER, env=env, pass_fds=(fd,))
        lsock.close()
        try:
            body = b""
            for _ in range(100):  # wait for the worker to serve
                try:
                    _, headers, body, _ = await _http_get(
                        "127.0.0.1", port, "/socket.io/?EIO=4&transport=polling")
                    break
                except (ConnectionError, asyncio.IncompleteReadError):
                    await asyncio.sleep(0.1)
            sid = json.loads(body.decode()[1:])["sid"]
            self.assertEqual(headers.get("connection"), "close")
            self.assertEqual(fake.sent(), [f"open {sid}"])
            q = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
            await _http_get("127.0.0.1", port, q, "POST", b"40")
            _, _, body, _ = await _http_get("127.0.0.1", port, q)
            packets = body.decode().split("\x1e")
            hello = json.loads(packets[1][2:])
            self.assertEqual(hello, ["hello", {"worker": 7, "pid": proc.pid, "lang": "python"}])
            await _http_get("127.0.0.1", port, q, "POST", b'421["echo",{"a":1}]')
            _, _, body, _ = await _http_get("127.0.0.1", port, q)
            self.assertEqual(body, b'431[{"a":1}]')
            await _http_get("127.0.0.1", port, q, "POST", b'422["whoami"]')
            _, _, body, _ = await _http_get("127.0.0.1", port, q)
            self.assertEqual(json.loads(body[3:]), [{"worker": 7, "pid": proc.pid, "lang": "python"}])
        finally:
            proc.terminate()
            rc = await asyncio.wait_for(proc.wait(), 10)
            await fake.stop()
        self.assertEqual(rc, 0)


if __name__ == "__main__":
    unittest.main()
