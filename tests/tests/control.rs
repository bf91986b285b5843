//! The control socket, end to end: who may say what, and what is refused.
//! The test process talks to it directly (it is not a worker); worker-side
//! lines are sent by real worker processes (the demo worker, or a Python
//! worker that relays raw lines on request).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use sticky_tests::{control_line, python3_bin, random_sid, Cluster, Response, TempDir};

#[test]
fn unknown_peer_is_refused() {
    let cluster = Cluster::start(1, &[]);
    let mut s = UnixStream::connect(&cluster.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"open abc\n").unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    println!("`open abc` from the test process: {:?}", answer.trim_end());
    assert!(answer.starts_with("err "), "{answer:?}");
    assert!(answer.contains("unknown peer"), "{answer:?}");
    // One answer, then the connection is closed: a second line gets nothing.
    let _ = s.write_all(b"close abc\n");
    let mut rest = Vec::new();
    let read = reader.read_to_end(&mut rest);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "connection should be closed after the refusal: {read:?} {rest:?}"
    );
    assert!(
        rest.is_empty(),
        "unexpected data after the refusal: {rest:?}"
    );
    assert_eq!(cluster.counter("sessions"), 0);
}

#[test]
fn stats_is_allowed_to_root() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "the tests run as root");
    let cluster = Cluster::start(2, &[]);
    let line = control_line(&cluster.control, "stats");
    println!("stats: {line}");
    assert!(line.starts_with("ok "), "{line}");
    assert!(line.contains(" live_workers=2 "), "{line}");
    assert!(line.contains(" sessions=0 "), "{line}");
    assert!(
        line.contains("worker0=pid:") && line.contains("worker1=pid:"),
        "{line}"
    );
}

#[test]
fn worker_session_ids_are_validated() {
    let cluster = Cluster::start(2, &[]);
    let mut accepted = 0;
    let longest = random_sid(64);
    for (sid, expect) in [
        (longest.clone(), 200),
        (longest.clone(), 200), // again: idempotent for its owner
        (format!("{longest}a"), 500),
        ("bad.sid".to_owned(), 500),
        ("a/b".to_owned(), 500),
        ("a%2Fb".to_owned(), 500),
        ("x".to_owned(), 200), // shortest
        (random_sid(20), 200),
    ] {
        let r = cluster.get(&format!("/register?sid={sid}"));
        println!(
            "register {sid:?} ({} bytes): {} {:?}",
            sid.len(),
            r.status,
            r.text().trim_end()
        );
        assert_eq!(r.status, expect, "sid {sid:?}: {}", r.text());
        if expect == 200 {
            accepted += 1;
        } else {
            assert!(r.text().starts_with("err "), "{}", r.text());
        }
    }
    let sessions = cluster.counter("sessions");
    println!("{accepted} accepted registrations (one repeated), sessions={sessions}");
    assert_eq!(sessions, accepted - 1);
    // The longest sid is routed by the kernel like any other.
    let by_sid = cluster.counter("by_sid");
    let owner = cluster.get(&format!("/?sid={longest}")).worker;
    for _ in 0..6 {
        assert_eq!(cluster.get(&format!("/?sid={longest}")).worker, owner);
    }
    assert_eq!(cluster.counter("by_sid"), by_sid + 7);
}

#[test]
fn idle_unknown_peers_do_not_lock_workers_out() {
    let cluster = Cluster::start(1, &[]);
    let idle = 1100;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        if limit.rlim_cur < 4096 && limit.rlim_max >= 4096 {
            limit.rlim_cur = 4096;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    // Any local user may connect (the socket is 0666); these never speak.
    let conns: Vec<UnixStream> = (0..idle)
        .map(|_| UnixStream::connect(&cluster.control).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let r = cluster.get(&format!("/register?sid={}", random_sid(20)));
    println!(
        "with {} idle connections of a non-worker: register -> {} {:?}",
        conns.len(),
        r.status,
        r.text().trim_end()
    );
    assert_eq!(r.status, 200, "a worker could not register: {}", r.text());
}

/// A worker that serves HTTP on fd 3 (socket activation) and relays raw
/// lines to `$STICKY_CONTROL` on request, so the tests can speak the control
/// protocol *as* a given worker. Query values are percent-decoded to bytes.
///
/// - `/ctl?as=W&line=L`: sends `L\n` on its persistent control connection,
///   answers `<reply line>\nclosed=<0|1>\n` (closed: the supervisor ended the
///   connection after that reply; the next line reconnects). 409 if this is
///   not worker W, without sending anything.
/// - `/bulk?as=W&n=N&prefix=P`: pipelines `open P<i>` for i < N on a new
///   connection, answers `ok=<n> err=<n> first_err=<reply>`.
/// - `/big?as=W&n=N`: sends `open ` and N bytes `a`, newline, on a new
///   connection; answers `<reply line>\nclosed=<0|1>\n`.
/// - `/spawn?as=W&line=L`: a child in a new session starts a grandchild that
///   sends L on its own control connection; answers the grandchild's
///   `pid=<pid> answer=<reply>`.
/// - anything else: `worker=W pid=P`.
///
/// Every response names the worker in `X-Sticky-Worker` / `X-Sticky-Pid`.
const RELAY_WORKER: &str = r#"
import os, socket, sys, threading, subprocess, select, urllib.parse
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

WORKER = os.environ.get("STICKY_WORKER", "?")
CONTROL = os.environ["STICKY_CONTROL"]
lock = threading.Lock()
conn = None

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(CONTROL)
    return s, s.makefile("rb")

def closed_by_peer(s):
    r, _, _ = select.select([s], [], [], 0.3)
    if not r:
        return False
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True

def exchange(line):
    global conn
    with lock:
        for attempt in range(2):
            if conn is None:
                conn = connect()
            s, f = conn
            try:
                s.sendall(line + b"\n")
                answer = f.readline()
                if not answer:
                    raise ConnectionError("eof")
            except OSError:
                s.close()
                conn = None
                if attempt == 1:
                    raise
                continue
            closed = answer.startswith(b"err") and closed_by_peer(s)
            if closed:
                s.close()
                conn = None
            return answer.rstrip(b"\n"), closed

def bulk(n, prefix):
    s, f = connect()
    s.settimeout(60)
    def writer():
        s.sendall(b"".join(b"open %s%d\n" % (prefix, i) for i in range(n)))
    t = threading.Thread(target=writer)
    t.start()
    ok = err = 0
    first = b"-"
    for _ in range(n):
        line = f.readline()
        if not line:
            break
        if line == b"ok\n":
            ok += 1
        else:
            err += 1
            if first == b"-":
                first = line.strip()
    t.join()
    s.close()
    return b"ok=%d err=%d first_err=%s" % (ok, err, first)

def big(n):
    s, f = connect()
    s.settimeout(20)
    try:
        s.sendall(b"open " + b"a" * n + b"\n")
    except OSError:
        pass  # the supervisor may close before reading it all
    answer = f.readline().rstrip(b"\n")
    closed = closed_by_peer(s)
    s.close()
    return answer, closed

GRANDCHILD = r'''
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["STICKY_CONTROL"])
s.sendall(sys.argv[1].encode() + b"\n")
answer = s.makefile("rb").readline().decode().strip()
print("pid=%d answer=%s" % (os.getpid(), answer.replace(" ", "_")))
'''
CHILD = r'''
import subprocess, sys
r = subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]], capture_output=True)
sys.stdout.write(r.stdout.decode())
'''

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Sticky-Worker", WORKER)
        self.send_header("X-Sticky-Pid", str(os.getpid()))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path, _, query = self.path.partition("?")
        q = {}
        for kv in query.split("&"):
            k, _, v = kv.partition("=")
            q[k] = urllib.parse.unquote_to_bytes(v)
        if "as" in q and q["as"].decode() != WORKER:
            return self.reply(409, b"not this worker\n")
        try:
            if path == "/ctl":
                answer, closed = exchange(q["line"])
                return self.reply(200, answer + b"\nclosed=%d\n" % closed)
            if path == "/big":
                answer, closed = big(int(q["n"]))
                return self.reply(200, answer + b"\nclosed=%d\n" % closed)
            if path == "/bulk":
                return self.reply(200, bulk(int(q["n"]), q["prefix"]))
            if path == "/spawn":
                r = subprocess.run(
                    [sys.executable, "-c", CHILD, GRANDCHILD, q["line"].decode()],
                    capture_output=True, start_new_session=True, timeout=20)
                return self.reply(200, r.stdout)
        except Exception as e:
            return self.reply(500, ("%s: %s\n" % (type(e).__name__, e)).encode())
        self.reply(200, b"worker=%s pid=%d\n" % (WORKER.encode(), os.getpid()))

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
server.daemon_threads = True
server.serve_forever()
"#;

/// A cluster of relay workers, round-robin. `wrap`: run the script under
/// `sh -c` so that the Python process is a child of the worker process.
fn relay_cluster(dir: &TempDir, workers: usize, wrap: bool) -> Cluster {
    relay_cluster_with(dir, workers, wrap, &[])
}

fn relay_cluster_with(dir: &TempDir, workers: usize, wrap: bool, extra: &[&str]) -> Cluster {
    let script = dir.0.join("relay.py");
    std::fs::write(&script, RELAY_WORKER).unwrap();
    let python = python3_bin();
    let (python, script) = (python.to_str().unwrap(), script.to_str().unwrap());
    let wrapped = format!("'{python}' '{script}'; exit $?");
    let command: Vec<&str> = if wrap {
        vec!["/bin/sh", "-c", &wrapped]
    } else {
        vec![python, script]
    };
    let args = [&["--balance", "round-robin"], extra].concat();
    let cluster = Cluster::start_with("127.0.0.1:0", workers, &args, &command);
    // Python starts slower than sticky reports: wait until each answers.
    for w in 0..workers {
        as_worker(&cluster, w, "/");
    }
    cluster
}

fn percent_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"_-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// GETs `target` (which has no `sid=`, so it is balanced) until worker `w`
/// answers it; other workers refuse it (409) without acting on it.
fn as_worker(cluster: &Cluster, w: usize, target: &str) -> Response {
    let sep = if target.contains('?') { '&' } else { '?' };
    let target = format!("{target}{sep}as={w}");
    let start = Instant::now();
    loop {
        let r = sticky_tests::request(cluster.addr, "GET", &target, b"");
        if r.worker == Some(w) {
            assert_eq!(r.status, 200, "{target}: {}", r.text());
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "worker {w} never answered {target}: {} {}\n{}",
            r.status,
            r.text(),
            cluster.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends one raw control line as worker `w`: (reply, connection closed).
fn line_as(cluster: &Cluster, w: usize, line: &[u8]) -> (String, bool) {
    let r = as_worker(cluster, w, &format!("/ctl?line={}", percent_encode(line)));
    let text = r.text();
    let (answer, closed) = text.split_once('\n').unwrap();
    let closed = closed.trim_end() == "closed=1";
    let shown = String::from_utf8_lossy(&line[..line.len().min(40)]);
    println!("worker {w} `{shown}`: {answer:?} closed={closed}");
    (answer.to_owned(), closed)
}

fn owner_of(cluster: &Cluster, sid: &str, n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| cluster.get(&format!("/?sid={sid}")).worker.unwrap())
        .collect()
}

#[test]
fn close_of_another_workers_sid_is_refused() {
    let dir = TempDir::new();
    let cluster = relay_cluster(&dir, 2, false);
    let x = format!("X{}", random_sid(19));

    assert_eq!(
        line_as(&cluster, 0, format!("open {x}").as_bytes()),
        ("ok".into(), false)
    );
    assert_eq!(owner_of(&cluster, &x, 4), vec![0; 4]);
    let (answer, closed) = line_as(&cluster, 1, format!("close {x}").as_bytes());
    assert!(
        answer.starts_with("err ") && answer.contains("another worker"),
        "{answer}"
    );
    assert!(
        !closed,
        "a worker's connection should survive a refused line"
    );
    let (answer, _) = line_as(&cluster, 1, format!("open {x}").as_bytes());
    assert!(
        answer.starts_with("err ") && answer.contains("another worker"),
        "{answer}"
    );
    assert_eq!(
        owner_of(&cluster, &x, 4),
        vec![0; 4],
        "refused lines moved the sid"
    );
    assert_eq!(
        cluster.stats()["worker0"].split(',').nth(1),
        Some("sessions:1")
    );
    assert_eq!(
        line_as(&cluster, 0, format!("close {x}").as_bytes()).0,
        "ok"
    );
    assert_eq!(cluster.counter("sessions"), 0);
    // Free again: worker 1 may take it now.
    assert_eq!(line_as(&cluster, 1, format!("open {x}").as_bytes()).0, "ok");
    assert_eq!(owner_of(&cluster, &x, 4), vec![1; 4]);
    assert_eq!(
        line_as(&cluster, 1, format!("close {x}").as_bytes()).0,
        "ok"
    );

    // A line longer than the cap: refused, and that connection is ended.
    let long = format!("open {}", "a".repeat(1995));
    assert_eq!(long.len(), 2000);
    let (answer, closed) = line_as(&cluster, 0, long.as_bytes());
    assert!(
        answer.starts_with("err ") && answer.contains("too long"),
        "{answer}"
    );
    assert!(
        closed,
        "the connection should be closed after an over-long line"
    );
    // The worker reconnects and carries on.
    let y = format!("Y{}", random_sid(19));
    assert_eq!(line_as(&cluster, 0, format!("open {y}").as_bytes()).0, "ok");

    // Binary garbage (no newline in it): an unknown command, connection kept.
    let garbage: Vec<u8> = (0u8..=255).filter(|&b| b != b'\n').rev().collect();
    let (answer, closed) = line_as(&cluster, 0, &garbage);
    assert!(answer.starts_with("err unknown command"), "{answer}");
    assert!(!closed);
    let (answer, _) = line_as(&cluster, 1, b"open");
    assert!(answer.starts_with("err "), "`open` without a sid: {answer}");
    let (answer, _) = line_as(&cluster, 1, b"open a b");
    assert!(answer.starts_with("err "), "`open a b`: {answer}");
    assert_eq!(
        line_as(&cluster, 1, b"stats").0.split(' ').next(),
        Some("ok")
    );

    // 20,000 pipelined opens from one worker, on one connection.
    let before = cluster.counter("sessions");
    let n = 20_000;
    let start = Instant::now();
    let r = as_worker(
        &cluster,
        1,
        &format!("/bulk?n={n}&prefix=bulk{}", random_sid(8)),
    );
    let took = start.elapsed();
    let stats = cluster.stats();
    println!(
        "{n} pipelined opens in {took:.1?}: {}; sessions {before} -> {}, worker1 {}",
        r.text(),
        stats["sessions"],
        stats["worker1"]
    );
    assert_eq!(r.text(), format!("ok={n} err=0 first_err=-"));
    assert_eq!(stats["sessions"], (before as usize + n).to_string());
    assert!(
        stats["worker1"].contains(&format!(",sessions:{n},")),
        "{}",
        stats["worker1"]
    );
    assert!(
        stats["worker0"].contains(",sessions:1,"),
        "{}",
        stats["worker0"]
    );
}

#[test]
fn descendants_of_a_worker_count_as_that_worker() {
    let dir = TempDir::new();
    // `sh -c 'python3 relay.py; exit $?'`: sh is the worker process, the
    // Python server its child.
    let cluster = relay_cluster(&dir, 2, true);
    let mut seen = HashMap::new();
    for w in 0..2 {
        let worker_pid = cluster.worker_pid(w).unwrap();
        let r = as_worker(&cluster, w, "/");
        let server_pid = r.pid.unwrap();
        assert_ne!(server_pid, worker_pid, "the server should be sh's child");

        // The Python server (a child of the worker process) registers.
        let child_sid = format!("c{w}{}", random_sid(18));
        let (answer, _) = line_as(&cluster, w, format!("open {child_sid}").as_bytes());
        assert_eq!(answer, "ok");

        // A grandchild of the server, in a session of its own.
        let grandchild_sid = format!("g{w}{}", random_sid(18));
        let r = as_worker(&cluster, w, &format!("/spawn?line=open%20{grandchild_sid}"));
        let text = r.text();
        println!(
            "worker {w}: sh pid {worker_pid}, server pid {server_pid}, grandchild: {}",
            text.trim_end()
        );
        let fields: HashMap<&str, &str> = text
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        assert_eq!(fields.get("answer"), Some(&"ok"), "{text}");
        let pid: u32 = fields["pid"].parse().unwrap();
        assert!(pid != worker_pid && pid != server_pid);

        for sid in [&child_sid, &grandchild_sid] {
            let owners = owner_of(&cluster, sid, 6);
            assert_eq!(owners, vec![w; 6], "sid {sid} should reach worker {w}");
        }
        seen.insert(w, cluster.stats()[&format!("worker{w}")].clone());
    }
    println!("{seen:?}");
    assert_eq!(cluster.counter("sessions"), 4);
    for w in 0..2 {
        assert!(seen[&w].contains(",sessions:2,"), "{seen:?}");
    }
}

/// Sends raw bytes from the test process (not a worker), returns the
/// answer line and whether the supervisor closed the connection after it.
fn stranger_sends(cluster: &Cluster, bytes: &[u8]) -> (String, bool) {
    let mut s = UnixStream::connect(&cluster.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes); // the supervisor may close before reading all
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let first = text.lines().next().unwrap_or("").to_owned();
    (first, text.lines().count() <= 1)
}

#[test]
fn hostile_control_lines_are_refused_without_harm() {
    let dir = TempDir::new();
    let cluster = relay_cluster(&dir, 2, false);
    let supervisor_fds = sticky_tests::fd_count(cluster.pid());

    // A 1 MiB line from a worker: refused after 1 KiB, connection closed.
    let r = as_worker(&cluster, 0, "/big?n=1048576");
    let text = r.text();
    println!("worker 0, 1 MiB line: {:?}", text.trim_end());
    assert!(text.starts_with("err line too long"), "{text}");
    assert!(text.ends_with("closed=1\n"), "{text}");
    // The same from a stranger, and binary garbage from a stranger.
    let big = [b"open ".as_slice(), &vec![b'a'; 1 << 20], b"\n"].concat();
    let (answer, closed) = stranger_sends(&cluster, &big);
    println!("stranger, 1 MiB line: {answer:?}, closed={closed}");
    assert!(
        answer.starts_with("err line too long") && closed,
        "{answer}"
    );
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    let (answer, closed) = stranger_sends(&cluster, &garbage);
    println!("stranger, 4 KiB of binary: {answer:?}, closed={closed}");
    assert!(answer.starts_with("err ") && closed, "{answer}");

    // Forging: the line cannot name a worker, and the environment of a
    // worker does not make a process one (SO_PEERCRED decides).
    let x = format!("F{}", random_sid(19));
    let (answer, _) = line_as(&cluster, 1, format!("open {x} worker=0").as_bytes());
    assert!(answer.starts_with("err "), "{answer}");
    let (answer, _) = line_as(&cluster, 1, format!("open {x}").as_bytes());
    assert_eq!(answer, "ok");
    assert_eq!(
        owner_of(&cluster, &x, 4),
        vec![1; 4],
        "the sid went to the sender, worker 1"
    );
    let worker0_env = std::process::Command::new(python3_bin())
        .args(["-c", FORGER])
        .env("STICKY_WORKER", "0")
        .env("STICKY_CONTROL", &cluster.control)
        .env("LISTEN_PID", cluster.worker_pid(0).unwrap().to_string())
        .arg(format!("close {x}"))
        .output()
        .unwrap();
    let forged = String::from_utf8_lossy(&worker0_env.stdout)
        .trim()
        .to_owned();
    println!("a process with worker 0's environment sends `close {x}`: {forged:?}");
    assert!(forged.contains("unknown peer"), "{forged}");
    assert_eq!(owner_of(&cluster, &x, 2), vec![1; 2]);

    // 100,000 pipelined opens from one worker, on one connection.
    let n = 100_000;
    let start = Instant::now();
    let r = as_worker(
        &cluster,
        0,
        &format!("/bulk?n={n}&prefix=h{}", random_sid(8)),
    );
    let took = start.elapsed();
    let stats = cluster.stats();
    println!(
        "{n} pipelined opens in {took:.1?}: {}; sessions={} kernel map entries={}",
        r.text(),
        stats["sessions"],
        sticky_tests::map_entries(cluster.pid(), "sessions")
    );
    assert_eq!(r.text(), format!("ok={n} err=0 first_err=-"));
    assert_eq!(stats["sessions"], (n + 1).to_string());
    assert_eq!(sticky_tests::map_entries(cluster.pid(), "sessions"), n + 1);
    // The worker exits: its 100,000 sessions leave the kernel map at once.
    let pid = cluster.worker_pid(0).unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    cluster.wait_for(
        "worker 0's sessions forgotten",
        Duration::from_secs(20),
        |c| c.stats()["sessions"] == "1",
    );
    assert_eq!(sticky_tests::map_entries(cluster.pid(), "sessions"), 1);
    // The dead worker's control connections close as the supervisor notices
    // their end, and its replacement is being started: let that settle.
    let settled = |c: &Cluster| sticky_tests::fd_count(c.pid()) <= supervisor_fds + 2;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !settled(&cluster) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let now = sticky_tests::fd_count(cluster.pid());
    println!("supervisor descriptors: {supervisor_fds} -> {now}");
    assert!(
        now <= supervisor_fds + 2,
        "supervisor descriptors grew: {supervisor_fds} -> {now}: {:?}",
        sticky_tests::fd_targets(cluster.pid())
    );
}

/// Sends argv[1] to $STICKY_CONTROL and prints the answer.
const FORGER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["STICKY_CONTROL"])
s.sendall(sys.argv[1].encode() + b"\n")
print(s.makefile("rb").readline().decode().strip())
"#;

#[test]
fn a_full_session_table_refuses_opens_until_one_closes() {
    let dir = TempDir::new();
    let cluster = relay_cluster_with(&dir, 2, false, &["--max-sessions", "1000"]);
    let prefix = format!("full{}", random_sid(8));
    let r = as_worker(&cluster, 0, &format!("/bulk?n=1200&prefix={prefix}"));
    println!("1200 opens into a table of 1000: {}", r.text());
    assert_eq!(
        r.text(),
        "ok=1000 err=200 first_err=err session table full (1000 sessions)"
    );
    // Full for every worker: worker 1 is refused too, nothing is evicted,
    // and registered sessions keep routing.
    let y = format!("Y{}", random_sid(19));
    let (answer, closed) = line_as(&cluster, 1, format!("open {y}").as_bytes());
    assert_eq!(answer, "err session table full (1000 sessions)");
    assert!(
        !closed,
        "a refused open must not cost the worker its connection"
    );
    assert_eq!(sticky_tests::map_entries(cluster.pid(), "sessions"), 1000);
    assert_eq!(owner_of(&cluster, &format!("{prefix}999"), 3), vec![0; 3]);
    // A close frees a place.
    let (answer, _) = line_as(&cluster, 0, format!("close {prefix}0").as_bytes());
    assert_eq!(answer, "ok");
    assert_eq!(line_as(&cluster, 1, format!("open {y}").as_bytes()).0, "ok");
    assert_eq!(owner_of(&cluster, &y, 3), vec![1; 3]);
}
