"""A keep-alive HTTP/1.1 worker with no sticky code that logs every request
line it reads, so that a test can tell which worker saw which request.

- `GET /socket.io/?EIO=4&transport=polling` (no sid): a real Engine.IO open
  packet with a fresh sid, which sticky learns for this worker;
- any other request: 200, `worker=<index>` (also with a sid it does not
  know: the tests check who answers, not Engine.IO);
- `GET /upgrade`: `101 Switching Protocols`, then every line the client
  sends is logged and echoed back (raw bytes, like WebSocket frames).

Each request line goes to stderr as `request-log worker=<i> <line>`.
"""
import http.server, json, os, secrets, socket, socketserver, sys

idx = os.environ.get("STICKY_WORKER", "?")


def log(line):
    sys.stderr.write(f"request-log worker={idx} {line}\n")
    sys.stderr.flush()


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def parse_request(self):
        log(self.raw_requestline.decode("latin-1").rstrip("\r\n"))
        return super().parse_request()

    def answer(self, body, code=200):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Sticky-Worker", idx)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/upgrade"):
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("X-Sticky-Worker", idx)
            self.end_headers()
            self.wfile.flush()
            for line in self.rfile:
                log("upgraded " + line.decode("latin-1").rstrip("\r\n"))
                self.wfile.write(b"echo " + line)
                self.wfile.flush()
            self.close_connection = True
            return
        if self.path.startswith("/socket.io/") and "sid=" not in self.path:
            sid = secrets.token_urlsafe(15)[:20]
            packet = {"sid": sid, "upgrades": [], "pingInterval": 25000,
                      "pingTimeout": 20000, "maxPayload": 1000000}
            self.answer(("0" + json.dumps(packet, separators=(",", ":"))).encode())
            return
        self.answer(f"worker={idx}\n".encode())

    do_POST = do_GET


class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def server_bind(self):
        pass  # the socket is sticky's listener, inherited as fd 3

    def server_activate(self):
        pass


server = S(("", 0), H, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
server.serve_forever()
