#!/usr/bin/env python3
"""Manual check: many concurrent Engine.IO long-polling Socket.IO sessions
against a server (normally `sticky run ... -- python3 e2e/workers/python_worker.py`).

Each session does, with raw HTTP requests (aiohttp client, a new TCP
connection per request):
  handshake GET -> POST `40` -> GET (CONNECT answer + `hello`) ->
  N x (POST `42<id>["echo",...]` -> GET the `43<id>` ack) ->
  POST `42<id>["whoami"]` -> GET -> POST `1` (close).
Optionally also upgrades some sessions to WebSocket (`--websocket K`).

Counts every non-200 answer, "Session ID unknown" / "Invalid session"
answers in particular, and sessions whose answers came from more than one
worker. Exit status 0 only when all sessions succeeded.

    python3 integrations/python/check_polling.py --port PORT --sessions 200
"""

import argparse
import asyncio
import json
import sys
import time

import aiohttp


class Stats:
    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.unknown_sid = 0
        self.non200 = 0
        self.requests = 0
        self.no_conn_close = 0
        self.mixed_worker = 0
        self.per_worker = {}
        self.errors = []


def decode_payload(text):
    """Engine.IO v4 polling payload: packets separated by \\x1e."""
    return [p for p in text.split("\x1e") if p]


class Session:
    def __init__(self, http, base, stats):
        self.http = http
        self.base = base
        self.stats = stats
        self.sid = None
        self.inbox = []

    async def _req(self, method, data=None, sid=True):
        url = self.base + "/socket.io/?EIO=4&transport=polling"
        if sid:
            url += "&sid=" + self.sid
        self.stats.requests += 1
        async with self.http.request(method, url, data=data) as r:
            body = await r.text()
            if r.headers.get("Connection", "").lower() != "close":
                self.stats.no_conn_close += 1
            if r.status != 200:
                self.stats.non200 += 1
                if "Session ID unknown" in body or "Invalid session" in body:
                    self.stats.unknown_sid += 1
                raise RuntimeError(f"{method} -> {r.status} {body[:100]}")
            return body

    async def get_until(self, predicate, limit=10):
        for _ in range(limit):
            for i, pkt in enumerate(self.inbox):
                if predicate(pkt):
                    return self.inbox.pop(i)
            body = await self._req("GET")
            for pkt in decode_payload(body):
                if pkt == "2":  # ping -> pong
                    await self._req("POST", data="3")
                else:
                    self.inbox.append(pkt)
        raise RuntimeError("expected packet not received")

    async def run(self, echoes):
        body = await self._req("GET", sid=False)
        assert body.startswith("0{"), body
        self.sid = json.loads(body[1:])["sid"]
        await self._req("POST", data="40")
        await self.get_until(lambda p: p.startswith("40"))
        hello = await self.get_until(lambda p: p.startswith('42["hello"'))
        first = json.loads(hello[2:])[1]
        for i in range(echoes):
            ack = 100 + i
            payload = {"n": i, "s": "x" * 50, "sid": self.sid}
            await self._req("POST", data=f"42{ack}" + json.dumps(["echo", payload]))
            got = await self.get_until(lambda p, a=ack: p.startswith(f"43{a}["))
            if json.loads(got[len(f"43{ack}"):]) != [payload]:
                raise RuntimeError(f"echo mismatch: {got[:100]}")
        await self._req("POST", data='4299["whoami"]')
        who = json.loads((await self.get_until(lambda p: p.startswith("4399[")))[4:])[0]
        await self._req("POST", data="1")
        if (who["worker"], who["pid"]) != (first["worker"], first["pid"]):
            self.stats.mixed_worker += 1
            raise RuntimeError(f"hello from {first}, whoami from {who}")
        return who["worker"]

    async def run_websocket(self, echoes):
        """Handshake by polling, then upgrade to WebSocket (as socket.io-client does)."""
        body = await self._req("GET", sid=False)
        self.sid = json.loads(body[1:])["sid"]
        await self._req("POST", data="40")
        await self.get_until(lambda p: p.startswith("40"))
        hello = await self.get_until(lambda p: p.startswith('42["hello"'))
        first = json.loads(hello[2:])[1]
        url = self.base.replace("http", "ws") + \
            f"/socket.io/?EIO=4&transport=websocket&sid={self.sid}"
        async with self.http.ws_connect(url) as ws:
            await ws.send_str("2probe")
            msg = await ws.receive_str()
            assert msg == "3probe", msg
            await ws.send_str("5")
            for i in range(echoes):
                await ws.send_str(f"42{i}" + json.dumps(["echo", {"i": i}]))
                while True:
                    m = await ws.receive_str()
                    if m == "2":
                        await ws.send_str("3")
                    elif m.startswith(f"43{i}["):
                        break
            await ws.send_str('4299["whoami"]')
            while True:
                m = await ws.receive_str()
                if m.startswith("4399["):
                    who = json.loads(m[4:])[0]
                    break
        if (who["worker"], who["pid"]) != (first["worker"], first["pid"]):
            self.stats.mixed_worker += 1
            raise RuntimeError(f"hello from {first}, whoami from {who}")
        return who["worker"]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--echoes", type=int, default=3)
    ap.add_argument("--websocket", type=int, default=0,
                    help="how many of the sessions upgrade to WebSocket")
    ap.add_argument("--concurrency", type=int, default=200)
    args = ap.parse_args()

    stats = Stats()
    base = f"http://{args.host}:{args.port}"
    sem = asyncio.Semaphore(args.concurrency)
    conn = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        async def one(i):
            async with sem:
                s = Session(http, base, stats)
                try:
                    if i < args.websocket:
                        w = await s.run_websocket(args.echoes)
                    else:
                        w = await s.run(args.echoes)
                    stats.ok += 1
                    stats.per_worker[w] = stats.per_worker.get(w, 0) + 1
                except Exception as e:
                    stats.failed += 1
                    stats.errors.append(f"{s.sid}: {type(e).__name__}: {e}")
        await asyncio.gather(*(one(i) for i in range(args.sessions)))
    dt = time.monotonic() - t0
    print(f"sessions={args.sessions} ok={stats.ok} failed={stats.failed} "
          f"unknown_sid={stats.unknown_sid} non200={stats.non200} "
          f"mixed_worker={stats.mixed_worker} "
          f"responses_without_connection_close={stats.no_conn_close} "
          f"http_requests={stats.requests} seconds={dt:.2f}")
    print("sessions per worker:", dict(sorted(stats.per_worker.items())))
    for e in stats.errors[:10]:
        print("error:", e)
    return 0 if stats.failed == 0 and stats.unknown_sid == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
