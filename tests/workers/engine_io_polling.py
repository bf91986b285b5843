"""A minimal Engine.IO v4 long-polling responder with no sticky code at all.

It answers a handshake (no `sid`) with a real open packet
`0{"sid":"...",...}` and any request carrying a sid it created with 200,
and one it does not know with engine.io's 400 "Session ID unknown", like a
real Engine.IO server. The tests use it to check the kernel's session
learning, expiry and clean-up without Node.js; the Socket.IO end-to-end
suite (e2e/) checks learning with real servers.
"""
import socket, os, http.server, socketserver, urllib.parse, secrets, json
idx = os.environ.get("STICKY_WORKER", "?")
# pid in the answers: a restarted worker does not know its predecessor's sids.
known = set()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        sid = q.get("sid", [None])[0]
        if sid is None:
            sid = secrets.token_urlsafe(15)[:20]
            known.add(sid)
            body = ("0" + json.dumps({"sid": sid, "upgrades": [], "pingInterval": 25000, "pingTimeout": 20000, "maxPayload": 1000000}, separators=(",", ":"))).encode()
            code = 200
        elif sid in known:
            body = f"6 worker={idx} pid={os.getpid()}".encode(); code = 200
        else:
            body = b'{"code":1,"message":"Session ID unknown"}'; code = 400
        self.send_response(code); self.send_header("Content-Type", "text/plain"); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    def server_bind(self): pass
    def server_activate(self): pass
s = S(("", 0), H, bind_and_activate=False); s.socket = socket.socket(fileno=3)
s.serve_forever()
