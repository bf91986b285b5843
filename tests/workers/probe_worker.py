"""A worker that reports what it can reach, for the least-privilege tests.

`GET /register?sid=S` registers S over the control socket. `GET
/probe?sid=S&sup=PID&victim=V` (placed on S's owner) tries, from inside the
worker process, what a compromised worker would: list and open the
supervisor's descriptors, take one with pidfd_getfd, and close session V of
another worker over the control socket. It answers one `name=outcome` line
per attempt.
Every answer carries X-Sticky-Worker / X-Sticky-Pid.
"""
import ctypes, errno, os, socket, socketserver, http.server, urllib.parse

IDX = os.environ.get("STICKY_WORKER", "?")
CONTROL = os.environ["STICKY_CONTROL"]
SYS_PIDFD_GETFD = 438
libc = ctypes.CDLL(None, use_errno=True)


def control(line):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(CONTROL)
        c.sendall(line.encode() + b"\n")
        return c.makefile().readline().strip()


def attempt(f):
    try:
        return "allowed: " + str(f())
    except OSError as e:
        return "refused: " + errno.errorcode.get(e.errno, str(e.errno))


def pidfd_getfd(pid, fd):
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        os.close(got)
        return got
    finally:
        os.close(pidfd)


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        if url.path == "/register":
            body = {"control": control("open " + q["sid"])}
        elif url.path == "/probe":
            sup = int(q["sup"])
            body = {
                "list_fds": attempt(lambda: len(os.listdir(f"/proc/{sup}/fd"))),
                "open_fd": attempt(lambda: os.close(os.open(f"/proc/{sup}/fd/3", os.O_RDONLY))),
                "pidfd_getfd": attempt(lambda: pidfd_getfd(sup, 3)),
                "environ": attempt(lambda: len(open(f"/proc/{sup}/environ", "rb").read())),
                "close_other": control("close " + q["victim"]),
                "open_own": control("open " + q["sid"]),
            }
        else:
            body = {"worker": IDX}
        data = "".join(f"{k}={v}\n" for k, v in body.items()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("X-Sticky-Worker", IDX)
        self.send_header("X-Sticky-Pid", str(os.getpid()))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def server_bind(self):
        pass

    def server_activate(self):
        pass


s = S(("", 0), H, bind_and_activate=False)
s.socket = socket.socket(fileno=3)
s.serve_forever()
