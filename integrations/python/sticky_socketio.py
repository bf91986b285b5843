"""sticky integration for python-socketio / python-engineio (asyncio).

Two things make an asyncio Socket.IO (or bare Engine.IO) server a correct
sticky worker:

* ``attach(sio)`` registers every Engine.IO session with the sticky
  supervisor (``open <sid>`` on the unix socket named by ``$STICKY_CONTROL``)
  *before* the handshake response leaves the process, and unregisters it
  (``close <sid>``) when the session ends. It also marks every Engine.IO HTTP
  response (long-polling) ``Connection: close``, so that a keep-alive TCP
  connection never carries requests of two sessions: sticky places a
  connection once, by the ``sid`` of its first request.
* ``serve(app)`` / ``run(app)`` serve an aiohttp application on the listening
  socket sticky hands over (fd 3, systemd socket activation:
  ``LISTEN_FDS=1``, ``LISTEN_PID=<pid>``), or on ``$PORT`` (default 3000) of
  127.0.0.1 when the process was not started by sticky.

``attach`` also works around a python-engineio/aiohttp bug that truncates
long-polling POST bodies larger than what has arrived at the first read (big
payloads over polling would otherwise never be delivered).

Without ``$STICKY_CONTROL`` (a plain ``python app.py``) registration is
skipped and the server behaves exactly as before.

Tested with python-socketio 5.18.1, python-engineio 4.15.1, aiohttp 3.14.5.
The hook wraps four methods of the ``engineio.AsyncServer`` instance
(``_handle_connect``, ``generate_id``, ``_trigger_event``, ``_make_response``);
``attach`` refuses loudly if they are missing.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import logging
import os
import signal
import socket
from typing import Any, Optional

__all__ = [
    "ControlClient",
    "StickyError",
    "StickyHook",
    "attach",
    "listen_socket",
    "run",
    "serve",
    "worker_index",
]

__version__ = "0.1.0"

log = logging.getLogger("sticky_socketio")

#: Longest line the supervisor accepts (including the newline).
MAX_LINE = 1024


class StickyError(Exception):
    """The supervisor answered ``err <reason>``."""


# --------------------------------------------------------------------------
# Control client
# --------------------------------------------------------------------------


class _Conn:
    """One unix stream connection to the supervisor, with the replies it is
    still owed, in request order (the protocol answers every line in order)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.broken = False
        self.task: Optional[asyncio.Task] = None

    def fail(self, exc: BaseException) -> None:
        if self.broken:
            return
        self.broken = True
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
        try:
            self.writer.close()
        except Exception:  # pragma: no cover - already closed
            pass

    async def read_loop(self) -> None:
        exc: BaseException
        try:
            while True:
                line = await self.reader.readline()
                if not line.endswith(b"\n"):
                    raise ConnectionError("control connection closed by sticky")
                text = line.decode("ascii", "replace").rstrip("\r\n")
                if not self.pending:
                    log.warning("unexpected line from sticky: %r", text)
                    continue
                fut = self.pending.popleft()
                if not fut.done():
                    fut.set_result(text)
        except asyncio.CancelledError:
            exc = ConnectionError("control client closed")
            self.fail(exc)
            raise
        except Exception as e:
            exc = e if isinstance(e, (OSError, ConnectionError)) else ConnectionError(str(e))
            self.fail(exc)


class ControlClient:
    """Client of sticky's control protocol over one persistent unix stream
    connection.

    Requests are pipelined: any number of coroutines may call ``open`` /
    ``close`` at once; lines are written in call order and the answers, which
    the supervisor sends in the same order, are matched back. If the
    connection drops (or sticky answers ``err ... reconnect``), the next
    request reconnects; ``open`` and ``close`` are idempotent, so a request
    whose answer was lost is simply sent again.
    """

    def __init__(self, path: str, *, timeout: float = 5.0, attempts: int = 4,
                 backoff: float = 0.05):
        self.path = path
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self._conn: Optional[_Conn] = None
        self._lock: Optional[asyncio.Lock] = None
        self._tasks: set[asyncio.Task] = set()
        self.connects = 0  # number of connections made (for tests / logs)

    async def _connection(self) -> _Conn:
        conn = self._conn
        if conn is not None and not conn.broken:
            return conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.broken:
                return conn
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path), self.timeout)
            conn = _Conn(reader, writer)
            conn.task = asyncio.get_running_loop().create_task(conn.read_loop())
            self._conn = conn
            self.connects += 1
            return conn

    async def _once(self, line: str) -> str:
        conn = await self._connection()
        fut = asyncio.get_running_loop().create_future()
        conn.pending.append(fut)
        conn.writer.write(line.encode("ascii") + b"\n")
        try:
            await conn.writer.drain()
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            # The answers on this connection can no longer be matched.
            conn.fail(ConnectionError("timed out waiting for sticky"))
            raise ConnectionError(f"no answer from sticky within {self.timeout}s")
        except (OSError, ConnectionError):
            conn.fail(ConnectionError("control connection lost"))
            raise

    async def request(self, line: str) -> str:
        """Send one line, return sticky's ``ok ...`` answer (without the
        newline). Raises ``StickyError`` on ``err <reason>`` and
        ``ConnectionError``/``OSError`` when sticky cannot be reached."""
        if "\n" in line or "\r" in line or len(line) + 1 > MAX_LINE:
            raise ValueError("invalid control line")
        last: BaseException = ConnectionError("unreachable")
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                reply = await self._once(line)
            except (OSError, ConnectionError) as e:
                last = e
                continue
            if reply == "ok" or reply.startswith("ok "):
                return reply
            reason = reply[4:] if reply.startswith("err ") else reply
            if "reconnect" in reason:
                # e.g. "err worker restarted; reconnect"
                conn = self._conn
                if conn is not None:
                    conn.fail(ConnectionError(reason))
                last = StickyError(reason)
                continue
            raise StickyError(reason)
        raise last

    async def open(self, sid: str) -> None:
        await self.request(f"open {sid}")

    async def close(self, sid: str) -> None:
        await self.request(f"close {sid}")

    async def stats(self) -> dict[str, str]:
        reply = await self.request("stats")
        out = {}
        for item in reply.split()[1:]:
            k, _, v = item.partition("=")
            out[k] = v
        return out

    def close_soon(self, sid: str) -> None:
        """Unregister ``sid`` in the background (errors are logged)."""
        task = asyncio.get_running_loop().create_task(self._close_quietly(sid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_quietly(self, sid: str) -> None:
        try:
            await self.close(sid)
        except Exception as e:
            log.warning("sticky: close %s failed: %s", sid, e)

    async def flush(self) -> None:
        """Wait for background ``close`` requests."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(ConnectionError("control client closed"))
            if conn.task is not None:
                conn.task.cancel()
                try:
                    await conn.task
                except (asyncio.CancelledError, Exception):
                    pass


# --------------------------------------------------------------------------
# Engine.IO hook
# --------------------------------------------------------------------------

# The sid pre-generated (and already registered) for the handshake being
# handled in this task: the wrapped generate_id() hands it out once.
_preset_sid: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar(
    "sticky_preset_sid", default=None)

_REQUIRED = ("_handle_connect", "generate_id", "_trigger_event", "_make_response")


def _is_websocket_scope(environ: dict) -> bool:
    scope = environ.get("asgi.scope")
    return isinstance(scope, dict) and scope.get("type") == "websocket"


class _ExactReader:
    """``read(n)`` returns ``n`` bytes (fewer only at end of stream)."""

    def __init__(self, stream: Any):
        self._stream = stream

    async def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return await self._stream.read()
        try:
            return await self._stream.readexactly(n)
        except asyncio.IncompleteReadError as e:
            return e.partial

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class StickyHook:
    """Installed on one ``engineio.AsyncServer`` by ``attach``."""

    def __init__(self, eio: Any, client: Optional[ControlClient], *,
                 strict: bool = True, connection_close: Optional[bool] = None,
                 sweep_interval: float = 30.0):
        self.eio = eio
        self.client = client
        self.strict = strict
        if connection_close is None:
            # Still on where sticky resets connections that carry another
            # worker's session: browsers resend on a new connection, Node's
            # socket.io-client does not complete a resent request.
            connection_close = True
        self.connection_close = connection_close
        self.sweep_interval = sweep_interval
        self.sessions: set[str] = set()  # sids registered with sticky
        self._sweeper: Optional[asyncio.Task] = None
        self._install()

    # -- installation ------------------------------------------------------

    def _install(self) -> None:
        eio = self.eio
        orig_generate_id = eio.generate_id
        orig_handle_connect = eio._handle_connect
        orig_trigger_event = eio._trigger_event
        orig_make_response = eio._make_response
        hook = self

        def generate_id():
            preset = _preset_sid.get()
            if preset:
                return preset.pop()
            return orig_generate_id()

        async def _handle_connect(environ, transport, jsonp_index=None):
            if hook.client is None:
                return await orig_handle_connect(environ, transport, jsonp_index)
            sid = orig_generate_id()
            try:
                await hook.client.open(sid)
            except Exception as e:
                log.error("sticky: open %s failed: %s", sid, e)
                if hook.strict:
                    return {
                        "status": "503 SERVICE UNAVAILABLE",
                        "headers": [("Content-Type", "text/plain"),
                                    ("Retry-After", "1")],
                        "response": b"session could not be registered with sticky",
                    }
            else:
                hook.sessions.add(sid)
                hook._start_sweeper()
            preset = [sid]
            token = _preset_sid.set(preset)
            try:
                return await orig_handle_connect(environ, transport, jsonp_index)
            finally:
                _preset_sid.reset(token)
                if preset:  # pragma: no cover - engine.io changed under us
                    log.error("sticky: engine.io did not use the registered sid")
                if sid not in eio.sockets or eio.sockets[sid].closed:
                    # rejected handshake, or a websocket session that ended
                    hook.forget(sid)

        async def _trigger_event(event, *args, **kwargs):
            try:
                return await orig_trigger_event(event, *args, **kwargs)
            finally:
                if event == "disconnect" and args:
                    hook.forget(args[0])

        async def _make_response(response_dict, environ):
            if hook.connection_close and not _is_websocket_scope(environ):
                response_dict = dict(response_dict)
                response_dict["headers"] = [
                    h for h in response_dict["headers"]
                    if h[0].lower() != "connection"
                ] + [("Connection", "close")]
            response = await orig_make_response(response_dict, environ)
            if hook.connection_close:
                force_close = getattr(response, "force_close", None)
                if callable(force_close):  # aiohttp: also close on our side
                    force_close()
            return response

        # python-engineio's aiohttp driver reads a polling POST body with
        # StreamReader.read(CONTENT_LENGTH), which returns whatever has
        # arrived so far: payloads larger than a few hundred KiB come out
        # truncated ("Incorrect padding", the client's emit never acked).
        # Read the whole declared length instead (this instance only).
        drivers = getattr(eio, "_async", None)
        if isinstance(drivers, dict) and "translate_request" in drivers \
                and not inspect.iscoroutinefunction(drivers["translate_request"]):
            orig_translate = drivers["translate_request"]

            def translate_request(*args, **kwargs):
                environ = orig_translate(*args, **kwargs)
                stream = environ.get("wsgi.input")
                if stream is not None and \
                        type(stream).__module__.startswith("aiohttp") and \
                        hasattr(stream, "readexactly"):
                    environ["wsgi.input"] = _ExactReader(stream)
                return environ

            eio._async = dict(drivers, translate_request=translate_request)

        eio.generate_id = generate_id
        eio._handle_connect = _handle_connect
        eio._trigger_event = _trigger_event
        eio._make_response = _make_response
        eio._sticky_hook = self

    # -- session bookkeeping -------------------------------------------------

    def forget(self, sid: str) -> None:
        """The Engine.IO session ``sid`` ended: unregister it (once)."""
        if sid in self.sessions:
            self.sessions.discard(sid)
            if self.client is not None:
                self.client.close_soon(sid)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Safety net: unregister sessions engine.io dropped without a
        disconnect event."""
        while self.sessions:
            await asyncio.sleep(self.sweep_interval)
            for sid in list(self.sessions):
                s = self.eio.sockets.get(sid)
                if s is None or s.closed:
                    self.forget(sid)


def _engineio_server(server: Any) -> Any:
    eio = getattr(server, "eio", server)  # socketio.AsyncServer has .eio
    missing = [m for m in _REQUIRED if not hasattr(eio, m)]
    if missing or not hasattr(eio, "sockets"):
        raise TypeError(
            "sticky_socketio.attach needs a socketio.AsyncServer or "
            "engineio.AsyncServer (python-engineio 4.x); missing: "
            + ", ".join(missing or ["sockets"]))
    if not inspect.iscoroutinefunction(eio._handle_connect):
        raise TypeError("sticky_socketio supports the asyncio servers only "
                        "(socketio.AsyncServer / engineio.AsyncServer)")
    return eio


def attach(server: Any, *, control_path: Optional[str] = None,
           strict: bool = True, connection_close: Optional[bool] = None,
           client: Optional[ControlClient] = None) -> StickyHook:
    """Make ``server`` (a ``socketio.AsyncServer`` or ``engineio.AsyncServer``)
    register its sessions with sticky.

    ``control_path`` defaults to ``$STICKY_CONTROL``; when neither is set,
    nothing is registered (only ``Connection: close`` is added). With
    ``strict`` (the default), a handshake whose session sticky could not
    record is answered ``503`` (the client retries) instead of creating a
    session whose later requests could reach another worker. Calling
    ``attach`` twice returns the first hook.
    """
    eio = _engineio_server(server)
    existing = getattr(eio, "_sticky_hook", None)
    if existing is not None:
        return existing
    if client is None:
        path = control_path if control_path is not None else os.environ.get("STICKY_CONTROL")
        client = ControlClient(path) if path else None
    return StickyHook(eio, client, strict=strict, connection_close=connection_close)


# --------------------------------------------------------------------------
# Serving on the inherited socket
# --------------------------------------------------------------------------

SD_LISTEN_FDS_START = 3


def worker_index() -> Optional[int]:
    """``$STICKY_WORKER`` as an int, or None outside sticky."""
    value = os.environ.get("STICKY_WORKER")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def listen_socket(unset_environment: bool = True) -> Optional[socket.socket]:
    """The listening socket inherited by socket activation (fd 3), or None
    when ``LISTEN_FDS``/``LISTEN_PID`` do not name this process."""
    try:
        fds = int(os.environ.get("LISTEN_FDS", "0"))
        pid = int(os.environ.get("LISTEN_PID", "0"))
    except ValueError:
        return None
    if fds < 1 or pid != os.getpid():
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    sock.setblocking(False)
    if unset_environment:
        # like sd_listen_fds(1): children must not believe they own fd 3
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    return sock


def _as_app(target: Any):
    from aiohttp import web

    if isinstance(target, web.Application):
        return target
    if hasattr(target, "attach") and (hasattr(target, "eio") or hasattr(target, "handle_request")):
        attach(target)
        app = web.Application()
        target.attach(app)
        return app
    raise TypeError("serve() takes an aiohttp web.Application or a "
                    "socketio/engineio AsyncServer")


async def serve(target: Any, *, host: str = "127.0.0.1", port: Optional[int] = None,
                shutdown_timeout: float = 2.0, ready: Optional[asyncio.Event] = None,
                stop: Optional[asyncio.Event] = None) -> None:
    """Serve ``target`` (an aiohttp ``web.Application``, or an AsyncServer
    which is then attached to a new application at its default path) until
    SIGTERM/SIGINT or until ``stop`` is set.

    Under sticky: on the inherited fd 3. Otherwise on ``host``:``port``
    (``port`` defaults to ``$PORT``, else 3000).
    """
    from aiohttp import web

    app = _as_app(target)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    sock = listen_socket()
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock)
        where = "inherited fd 3 (%s)" % (sock.getsockname(),)
    else:
        if port is None:
            port = int(os.environ.get("PORT", "3000"))
        site = web.TCPSite(runner, host, port)
        where = f"{host}:{port}"
    await site.start()
    log.info("listening on %s", where)

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    installed = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
            pass
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        for server in _servers_of(app):
            hook = getattr(server, "_sticky_hook", None)
            if hook is not None and hook.client is not None:
                try:  # let pending `close` lines out, briefly
                    await asyncio.wait_for(hook.client.flush(), 1.0)
                except asyncio.TimeoutError:
                    pass
                await hook.client.aclose()


def _servers_of(app: Any) -> list:
    """engineio servers whose routes are on ``app`` (best effort)."""
    out = []
    try:
        for route in app.router.routes():
            handler = getattr(route, "handler", None)
            owner = getattr(handler, "__self__", None)
            if owner is not None and hasattr(owner, "_sticky_hook") and owner not in out:
                out.append(owner)
    except Exception:  # pragma: no cover
        pass
    return out


def run(target: Any, **kwargs: Any) -> None:
    """Blocking ``serve()``: a drop-in for ``aiohttp.web.run_app(app)``."""
    asyncio.run(serve(target, **kwargs))
