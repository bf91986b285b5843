"""Direct check of sticky on the running kernel, printed as `probe KEY=VALUE`
lines: does `sticky run` load, does a sid-carrying connection reach its
owner, and is a worker blocked in epoll_wait woken when a connection is
migrated onto its listener. Runs inside a `cargo xtask kernels` guest, whose
network stack is its own: the fixed port cannot collide with anything."""

import os
import select
import signal
import socket
import subprocess
import sys
import time

PORT = 3000
SID = "kernelprobe000000001"

# The worker: waits in epoll_wait on its inherited listener (fd 3), answers
# with its index, and reports `/register?sid=` to the supervisor.
WORKER = r"""
import os, select, socket
listener = socket.socket(fileno=3)
listener.setblocking(False)
poll = select.epoll()
poll.register(3, select.EPOLLIN)
me = os.environ["STICKY_WORKER"]
while True:
    poll.poll()
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        continue
    conn.setblocking(True)
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(4096)
        if not chunk:
            break
        request += chunk
    target = request.split(b" ")[1].decode() if request.count(b" ") >= 2 else "/"
    if target.startswith("/register?sid="):
        control = socket.socket(socket.AF_UNIX)
        control.connect(os.environ["STICKY_CONTROL"])
        control.sendall(("open " + target.split("=", 1)[1] + "\n").encode())
        control.recv(100)
        control.close()
    conn.sendall(("HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(me), me)).encode())
    conn.close()
"""


def stats():
    """The supervisor's `stats` fields."""
    control = socket.socket(socket.AF_UNIX)
    control.connect(f"/tmp/sticky-{PORT}.sock")
    control.sendall(b"stats\n")
    line = control.makefile().readline()
    control.close()
    return dict(f.split("=", 1) for f in line.split() if "=" in f)


def placed_queue():
    """How many connections the supervisor's rotations have migrated."""
    return int(stats().get("placed_queue", 0))


def report(key, value):
    print(f"probe {key}={value}", flush=True)


def send(target):
    s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n".encode())
    return s


def answer(s):
    """The answering worker's index, or None if nothing came in time."""
    data = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    finally:
        s.close()
    return data.split(b"\r\n\r\n", 1)[1].decode() if b"\r\n\r\n" in data else None


def main():
    sticky = subprocess.Popen(
        [os.environ["STICKY_BIN"], "run", "--listen", f"127.0.0.1:{PORT}", "--workers", "2",
         "--", sys.executable, "-c", WORKER],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        if sticky.poll() is not None:
            lines = [l for l in sticky.stderr.read().splitlines() if l.strip()]
            report("loads", "no")
            report("exit", sticky.returncode)
            report("error_lines", len(lines))
            for line in lines:
                report("error", line)
            return
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                report("loads", "no")
                report("error", "nothing listens after 60 s")
                sticky.kill()
                return
            time.sleep(0.2)
    report("loads", "yes")
    try:
        # The workers (Python, under emulation) take a while to start; until
        # one listens sticky answers 503.
        while answer(send("/")) not in ("0", "1"):
            if time.monotonic() > deadline:
                report("error", "no worker answered after 60 s")
                return
            time.sleep(0.2)
        owner = answer(send(f"/register?sid={SID}"))
        hits = [answer(send(f"/?sid={SID}")) for _ in range(20)]
        report("places", "yes" if owner is not None and hits.count(owner) == 20 else "no")
        report("places_detail", f"owner={owner} hits={hits}")
        # `reset` when sticky's own SOCK_DESTROY probe at start worked.
        report("foreign", stats().get("foreign_requests", "unknown"))

        # Freeze the supervisor: first segments queue on the sorting
        # listener. Thawed, it rotates and the kernel migrates them onto the
        # owner's listener, whose worker sleeps in epoll_wait.
        queued_before = placed_queue()
        os.kill(sticky.pid, signal.SIGSTOP)
        time.sleep(0.3)
        pending = [send(f"/?sid={SID}") for _ in range(5)]
        time.sleep(0.3)
        os.kill(sticky.pid, signal.SIGCONT)
        woken = [answer(s) for s in pending]
        migrated = placed_queue() - queued_before
        report("wakeup", "yes" if woken.count(owner) == 5 and migrated >= 1 else "no")
        report("wakeup_detail", f"owner={owner} answers={woken} migrated={migrated}")
    finally:
        os.kill(sticky.pid, signal.SIGCONT)
        sticky.terminate()
        try:
            sticky.wait(10)
        except subprocess.TimeoutExpired:
            sticky.kill()


main()
