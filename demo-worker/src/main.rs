//! A deliberately small HTTP/1.1 worker for sticky.
//!
//! It is the process sticky supervises in the demo, in the integration tests
//! and in the benchmarks, so it favours being predictable and dependency-free
//! (std + libc, one thread per connection, no async runtime) over raw speed.
//! Every response names the worker that produced it (`X-Sticky-Worker`,
//! `X-Sticky-Pid`) so a client can see where the kernel placed its
//! connection, and `/register` / `/unregister` report sessions to the
//! supervisor over the `$STICKY_CONTROL` line protocol, as a real Engine.IO
//! worker would.
//!
//! Without sticky (no socket activation) it listens on `--listen ADDR:PORT`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest request head (request line + headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted (echo tests use 8 MiB).
const MAX_BODY: usize = 128 << 20;
/// Largest `/bytes?n=` answered.
const MAX_BYTES: u64 = 64 << 20;
/// How often blocked loops look at the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How long to wait for the supervisor's reply to a control line.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Set by SIGTERM/SIGINT; everything else polls it.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    if let Err(e) = run() {
        eprintln!("demo-worker: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let listen = parse_args()?;
    let listener = match inherited_listener() {
        Some(l) => l,
        None => {
            TcpListener::bind(&listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?
        }
    };
    // Safety: the handler only stores to an atomic, which is signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let worker = Arc::new(Worker {
        index: std::env::var("STICKY_WORKER").unwrap_or_else(|_| "0".into()),
        pid: std::process::id(),
        control_path: std::env::var("STICKY_CONTROL")
            .ok()
            .filter(|p| !p.is_empty()),
        control: Mutex::new(None),
    });
    eprintln!("demo-worker {} pid {} serving", worker.index, worker.pid);

    let active = Arc::new(AtomicUsize::new(0));
    while !STOP.load(Ordering::SeqCst) {
        // Poll with a timeout rather than block in accept(), so SIGTERM is
        // noticed promptly without touching the (possibly shared) socket's
        // flags.
        if !readable(listener.as_raw_fd(), TICK) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning.
                eprintln!("demo-worker: accept: {e}");
                std::thread::sleep(TICK);
                continue;
            }
        };
        start_serving(stream, &worker, &active);
    }

    // Connections already in our accept queue were promised to us: serve
    // them (readable means one is queued; nobody else accepts here), then
    // stop accepting and let in-flight requests finish.
    while readable(listener.as_raw_fd(), Duration::ZERO) {
        match listener.accept() {
            Ok((stream, _)) => start_serving(stream, &worker, &active),
            Err(_) => break,
        }
    }
    drop(listener);
    let deadline = Instant::now() + DRAIN_LIMIT;
    while active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Serves one accepted connection on its own thread.
fn start_serving(stream: TcpStream, worker: &Arc<Worker>, active: &Arc<AtomicUsize>) {
    let guard = ActiveGuard::new(active);
    let worker = Arc::clone(worker);
    let spawned = std::thread::Builder::new().spawn(move || {
        let _guard = guard;
        // Errors just end the connection: the peer went away.
        let _ = serve(stream, &worker);
    });
    if let Err(e) = spawned {
        eprintln!("demo-worker: cannot spawn a connection thread: {e}");
    }
}

fn parse_args() -> Result<String, String> {
    let mut listen = "127.0.0.1:3000".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs ADDR:PORT")?,
            s if s.starts_with("--listen=") => listen = s["--listen=".len()..].to_string(),
            "-h" | "--help" => {
                println!("usage: sticky-demo-worker [--listen ADDR:PORT]  (default 127.0.0.1:3000; fd 3 under socket activation)");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(listen)
}

/// The listener passed by sticky (systemd convention): fd 3, if
/// `LISTEN_FDS=1` and `LISTEN_PID` is us (otherwise it was meant for a
/// parent and the fd is not ours).
fn inherited_listener() -> Option<TcpListener> {
    let fds = std::env::var("LISTEN_FDS").ok()?;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.trim().parse().ok()?;
    if fds.trim() != "1" || pid != std::process::id() {
        return None;
    }
    // Safety: by the convention above, fd 3 is a listening socket handed to
    // this process and owned by nothing else in it.
    Some(unsafe { TcpListener::from_raw_fd(3) })
}

fn readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Safety: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Counts a live connection thread for as long as it exists (even if it
/// panics), so shutdown can wait for in-flight requests.
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(Arc::clone(active))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Worker {
    index: String,
    pid: u32,
    control_path: Option<String>,
    /// One shared connection to the supervisor: a session registration is
    /// one line and one reply, serialised by the mutex.
    control: Mutex<Option<BufReader<UnixStream>>>,
}

impl Worker {
    /// Sends `<verb> <sid>` to the supervisor; Ok on `ok`, Err(reply or
    /// reason) otherwise. Reconnects once if the connection broke (the
    /// supervisor may have restarted).
    fn control(&self, verb: &str, sid: &str) -> Result<(), String> {
        let path = self
            .control_path
            .as_deref()
            .ok_or("err STICKY_CONTROL is not set")?;
        let line = format!("{verb} {sid}\n");
        let mut conn = self.control.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            if conn.is_none() {
                let stream = UnixStream::connect(path)
                    .map_err(|e| format!("err cannot connect to {path}: {e}"))?;
                let _ = stream.set_read_timeout(Some(CONTROL_TIMEOUT));
                *conn = Some(BufReader::new(stream));
            }
            match exchange(conn.as_mut().unwrap(), &line) {
                Ok(reply) if reply == "ok" => return Ok(()),
                Ok(reply) => return Err(reply),
                Err(e) => {
                    // A half-done exchange leaves the stream out of step.
                    *conn = None;
                    if attempt == 1 {
                        return Err(format!("err control connection: {e}"));
                    }
                }
            }
        }
        unreachable!()
    }
}

fn exchange(conn: &mut BufReader<UnixStream>, line: &str) -> io::Result<String> {
    conn.get_mut().write_all(line.as_bytes())?;
    let mut reply = String::new();
    if conn.read_line(&mut reply)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(reply.trim_end().to_string())
}

struct Request {
    method: String,
    target: String,
    close: bool,
    body: Vec<u8>,
}

/// What the kernel negotiated for this connection, server side (TCP_INFO):
/// `ts=1 sack=1 wscale=7,10 ecn=0 snd_mss=65483 rcv_mss=536` (wscale:
/// the client's, then ours; `-` without window scaling).
fn tcp_options(stream: &TcpStream) -> io::Result<String> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let opt = |bit: u8| u8::from(info.tcpi_options & bit != 0);
    // tcpi_snd_wscale (low 4 bits) and tcpi_rcv_wscale (high 4 bits) share a byte.
    let scales = info.tcpi_snd_rcv_wscale;
    let wscale = if opt(4) == 1 {
        format!("{},{}", scales & 0xf, scales >> 4)
    } else {
        "-".to_owned()
    };
    Ok(format!(
        "ts={} sack={} wscale={wscale} ecn={} snd_mss={} rcv_mss={}",
        opt(1),
        opt(2),
        opt(8),
        info.tcpi_snd_mss,
        info.tcpi_rcv_mss
    ))
}

enum Next {
    Request(Request),
    /// Peer closed (or we are stopping) between requests.
    Closed,
    /// Malformed request: answer with this status and message, then close.
    Bad(u16, &'static str),
}

/// One client connection; `buf` holds bytes read but not yet consumed
/// (pipelined requests).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads more into `buf`; Ok(0) on EOF, or when stopping while idle
    /// between requests. The read timeout exists only to look at the stop
    /// flag.
    fn fill(&mut self, in_request: bool) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if is_timeout(&e) => {
                    if !in_request && STOP.load(Ordering::SeqCst) {
                        return Ok(0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads exactly `dst.len()` bytes into `dst` (leftovers in `buf` first),
    /// without the intermediate copy of `fill`, for large bodies.
    fn read_body(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let have = self.buf.len().min(dst.len());
        dst[..have].copy_from_slice(&self.buf[..have]);
        self.buf.drain(..have);
        let mut filled = have;
        while filled < dst.len() {
            match self.stream.read(&mut dst[filled..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn next_request(&mut self) -> io::Result<Next> {
        // Tolerate stray CRLFs between requests (RFC 9112 section 2.2).
        let blank = self
            .buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        self.buf.drain(..blank);
        let mut searched = 0;
        let head_len = loop {
            if let Some(pos) = find(&self.buf[searched..], b"\r\n\r\n") {
                break searched + pos + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Ok(Next::Bad(431, "request head too large"));
            }
            searched = self.buf.len().saturating_sub(3);
            if self.fill(!self.buf.is_empty())? == 0 {
                return Ok(Next::Closed);
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_len).collect();
        let Ok(head) = std::str::from_utf8(&head) else {
            return Ok(Next::Bad(400, "request head is not UTF-8"));
        };
        let mut lines = head.split("\r\n");
        let mut parts = lines.next().unwrap_or("").split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Ok(Next::Bad(400, "malformed request line"));
        };
        if method.is_empty() || !target.starts_with('/') {
            return Ok(Next::Bad(400, "malformed request line"));
        }
        let mut close = match version {
            "HTTP/1.1" => false,
            "HTTP/1.0" => true,
            _ => return Ok(Next::Bad(400, "unsupported HTTP version")),
        };
        let mut length: Option<usize> = None;
        for line in lines.filter(|l| !l.is_empty()) {
            let Some((name, value)) = line.split_once(':') else {
                return Ok(Next::Bad(400, "malformed header"));
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let Ok(n) = value.parse::<usize>() else {
                    return Ok(Next::Bad(400, "bad Content-Length"));
                };
                if length.is_some_and(|l| l != n) {
                    return Ok(Next::Bad(400, "conflicting Content-Length"));
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Ok(Next::Bad(400, "Transfer-Encoding is not supported"));
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        close = false;
                    }
                }
            }
        }
        let length = length.unwrap_or(0);
        if length > MAX_BODY {
            return Ok(Next::Bad(413, "request body too large"));
        }
        let mut body = vec![0u8; length];
        self.read_body(&mut body)?;
        Ok(Next::Request(Request {
            method: method.to_string(),
            target: target.to_string(),
            close,
            body,
        }))
    }

    fn respond(&mut self, w: &Worker, status: u16, body: &[u8], close: bool) -> io::Result<()> {
        let mut out = head(w, status, body.len() as u64, close).into_bytes();
        // One write for small responses; no copy of large ones.
        if body.len() <= 16 * 1024 {
            out.extend_from_slice(body);
            self.stream.write_all(&out)
        } else {
            self.stream.write_all(&out)?;
            self.stream.write_all(body)
        }
    }

    /// `/bytes`: n bytes of the pattern i % 251, streamed in chunks whose
    /// length is a multiple of 251 so the pattern continues across them.
    fn respond_bytes(&mut self, w: &Worker, n: u64, close: bool) -> io::Result<()> {
        self.stream.write_all(head(w, 200, n, close).as_bytes())?;
        let chunk: Vec<u8> = (0..251 * 256).map(|i| (i % 251) as u8).collect();
        let mut left = n;
        while left > 0 {
            let len = left.min(chunk.len() as u64) as usize;
            self.stream.write_all(&chunk[..len])?;
            left -= len as u64;
        }
        Ok(())
    }

    /// Closing with unread input makes the kernel send RST, which can
    /// destroy the error response before the client reads it: send FIN and
    /// discard input for a moment first.
    fn linger(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut sink = [0u8; 16 * 1024];
        while Instant::now() < deadline {
            match self.stream.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn head(w: &Worker, status: u16, len: u64, close: bool) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Unknown",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n\
         X-Sticky-Worker: {}\r\nX-Sticky-Pid: {}\r\n{}\r\n",
        w.index,
        w.pid,
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// Value of `key` in a query string (no percent-decoding: sids are
/// URL-safe).
fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

fn valid_sid(sid: &str) -> bool {
    !sid.is_empty() && sid.len() <= 256 && sid.bytes().all(|b| b.is_ascii_graphic())
}

fn serve(stream: TcpStream, w: &Worker) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TICK))?;
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    loop {
        let req = match conn.next_request()? {
            Next::Request(r) => r,
            Next::Closed => return Ok(()),
            Next::Bad(status, msg) => {
                conn.respond(w, status, format!("{msg}\n").as_bytes(), true)?;
                conn.linger();
                return Ok(());
            }
        };
        // After SIGTERM, finish this request and then close.
        let close = req.close || STOP.load(Ordering::SeqCst);
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let whoami = format!("worker={} pid={}\n", w.index, w.pid);
        match (req.method.as_str(), path) {
            ("GET", "/register") | ("GET", "/unregister") => {
                let (verb, done) = if path == "/register" {
                    ("open", "registered")
                } else {
                    ("close", "unregistered")
                };
                match param(query, "sid").filter(|s| valid_sid(s)) {
                    None => conn.respond(w, 400, b"missing or invalid sid\n", close)?,
                    Some(sid) => match w.control(verb, sid) {
                        Ok(()) => {
                            let body = format!("worker={} {done}={sid}\n", w.index);
                            conn.respond(w, 200, body.as_bytes(), close)?
                        }
                        Err(line) => conn.respond(w, 500, format!("{line}\n").as_bytes(), close)?,
                    },
                }
            }
            ("POST", "/echo") => conn.respond(w, 200, &req.body, close)?,
            ("GET", "/bytes") => match param(query, "n").and_then(|n| n.parse::<u64>().ok()) {
                Some(n) if n <= MAX_BYTES => conn.respond_bytes(w, n, close)?,
                _ => conn.respond(w, 400, b"n must be 0..=67108864\n", close)?,
            },
            ("GET", "/sleep") => match param(query, "ms").and_then(|n| n.parse::<u64>().ok()) {
                Some(ms) if ms <= 600_000 => {
                    std::thread::sleep(Duration::from_millis(ms));
                    conn.respond(w, 200, whoami.as_bytes(), close)?
                }
                _ => conn.respond(w, 400, b"ms must be 0..=600000\n", close)?,
            },
            ("GET", "/tcp_info") => {
                let body = format!("{} {}\n", whoami.trim_end(), tcp_options(&conn.stream)?);
                conn.respond(w, 200, body.as_bytes(), close)?
            }
            _ => conn.respond(w, 200, whoami.as_bytes(), close)?,
        }
        if close {
            return Ok(());
        }
    }
}
