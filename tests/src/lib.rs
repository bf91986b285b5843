//! Support for sticky's integration tests: start a real `sticky run` with
//! real worker processes on an ephemeral port, talk raw HTTP/1.1 to it over
//! real sockets, read its counters from the control socket.
//!
//! Binaries come from `STICKY_BIN` and `STICKY_DEMO_WORKER` (set by
//! `cargo xtask test`), else from the workspace's `target/debug`. The tests
//! load BPF programs, so they need root.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How much counter `k` grew between two `Cluster::stats` answers.
pub fn delta(before: &HashMap<String, String>, after: &HashMap<String, String>, k: &str) -> u64 {
    after[k].parse::<u64>().unwrap() - before[k].parse::<u64>().unwrap()
}

/// A minimal Engine.IO long-polling responder with no sticky code (run
/// with `python3_bin()`): its sessions reach sticky only by learning.
pub const ENGINE_IO_POLLING_PY: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/workers/engine_io_polling.py");

/// The start of `Cluster::start_reporting`'s worker script (run as
/// `python3 SCRIPT DIR`): `live_fds()`, the descriptors it holds, and
/// `write_report(lines)`, which writes a dict's `key=value` lines to
/// `DIR/worker-$STICKY_WORKER` for `Cluster::worker_reports`, then waits to
/// be stopped.
const WORKER_REPORT_PY: &str = r#"
import os, sys, signal

def live_fds():
    # The descriptor listdir used is closed again by now: keep only live ones.
    def valid(fd):
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False
    return sorted(f for f in (int(x) for x in os.listdir("/proc/self/fd")) if valid(f))

def write_report(lines):
    out = os.path.join(sys.argv[1], "worker-" + os.environ.get("STICKY_WORKER", "x"))
    with open(out + ".tmp", "w") as f:
        for k, v in lines.items():
            f.write(k + "=" + v + "\n")
    os.rename(out + ".tmp", out)
    while True:
        signal.pause()
"#;

pub fn sticky_bin() -> PathBuf {
    binary("STICKY_BIN", "sticky")
}

pub fn demo_worker_bin() -> PathBuf {
    binary("STICKY_DEMO_WORKER", "sticky-demo-worker")
}

/// A Python 3 interpreter for scripted test workers: `STICKY_PYTHON` (the
/// project's virtual environment, set by `cargo xtask test`), else the
/// system one when there is one (a version-manager shim is a shell script
/// that would add a process and descriptors of its own), else whatever
/// `python3` PATH finds.
pub fn python3_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STICKY_PYTHON") {
        return p.into();
    }
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

fn binary(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo xtask test` (or build the workspace first)",
        p.display()
    );
    p
}

/// A running `sticky run`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Cluster {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub control: PathBuf,
    pub log: Arc<Mutex<String>>,
    _dir: TempDir,
}

impl Cluster {
    /// `sticky run --listen 127.0.0.1:0 --workers N <extra> -- demo-worker`.
    pub fn start(workers: usize, extra: &[&str]) -> Cluster {
        let worker = demo_worker_bin();
        Cluster::start_with("127.0.0.1:0", workers, extra, &[worker.to_str().unwrap()])
    }

    pub fn start_with(listen: &str, workers: usize, extra: &[&str], command: &[&str]) -> Cluster {
        Cluster::start_custom(listen, workers, extra, command, |_| {})
    }

    /// Like `start_with`; `configure` adjusts sticky's own `Command` before
    /// it is spawned (environment, descriptors through `pre_exec`, ...).
    pub fn start_custom(
        listen: &str,
        workers: usize,
        extra: &[&str],
        command: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Cluster {
        let dir = TempDir::new();
        let control = dir.0.join("control.sock");
        Cluster::start_inner(listen, workers, extra, command, configure, dir, control)
    }

    /// Like `start_with`, with the control socket at `control` (e.g. the
    /// path an earlier sticky's workers still know).
    pub fn start_with_control(
        listen: &str,
        control: &std::path::Path,
        workers: usize,
        extra: &[&str],
        command: &[&str],
    ) -> Cluster {
        let dir = TempDir::new();
        Cluster::start_inner(
            listen,
            workers,
            extra,
            command,
            |_| {},
            dir,
            control.to_owned(),
        )
    }

    fn start_inner(
        listen: &str,
        workers: usize,
        extra: &[&str],
        command: &[&str],
        configure: impl FnOnce(&mut Command),
        dir: TempDir,
        control: PathBuf,
    ) -> Cluster {
        let mut sticky = Command::new(sticky_bin());
        configure(&mut sticky);
        let mut child = sticky
            .args([
                "run",
                "--listen",
                listen,
                "--workers",
                &workers.to_string(),
                "--control",
            ])
            .arg(&control)
            .args(extra)
            .arg("--")
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting sticky");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split(' ').next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        // 90 s: under TCG (the kernel matrix) loading the programs alone can
        // take half a minute.
        let addr = match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(a) => a.parse().expect("address in the listening line"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!("sticky did not start:\n{}", log.lock().unwrap());
            }
        };
        Cluster {
            child: Some(child),
            addr,
            control,
            log,
            _dir: dir,
        }
    }

    /// One request on a new connection (`Connection: close`).
    pub fn get(&self, target: &str) -> Response {
        request(self.addr, "GET", target, b"")
    }

    /// Registers a fresh sid on whichever worker takes the request.
    pub fn register_any(&self, sid: &str) -> usize {
        let r = self.get(&format!("/register?sid={sid}"));
        assert_eq!(r.status, 200, "register {sid}: {}", r.text());
        r.worker.expect("worker header")
    }

    /// Registers fresh sids until every worker owns at least `per_worker`;
    /// returns (sid, owner) pairs.
    pub fn sessions_on_every_worker(
        &self,
        workers: usize,
        per_worker: usize,
    ) -> Vec<(String, usize)> {
        let mut owned = Vec::new();
        let mut counts = vec![0; workers];
        for n in 0..1000 {
            if counts.iter().all(|&c| c >= per_worker) {
                return owned;
            }
            let sid = format!("s{n:04}{}", random_sid(14));
            let w = self.register_any(&sid);
            counts[w] += 1;
            owned.push((sid, w));
        }
        panic!("could not place sessions on every worker: {counts:?}");
    }

    /// `total` sid-carrying long-polling requests, each on a new
    /// connection, from `clients` threads; returns how many were not
    /// answered 200 by their sid's owner.
    pub fn sid_requests_from(
        &self,
        sessions: &[(String, usize)],
        total: usize,
        clients: usize,
    ) -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (wrong, next) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for _ in 0..clients {
                scope.spawn(|| loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return;
                    }
                    let (sid, owner) = &sessions[n % sessions.len()];
                    let target = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
                    let r = request(self.addr, "GET", &target, b"");
                    if r.status != 200 || r.worker != Some(*owner) {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        wrong.load(Ordering::Relaxed)
    }

    /// `n` requests, in blocks of one sid each, from `threads` clients at
    /// once; returns how many reached the sid's owner (every one must be
    /// answered).
    pub fn requests_on_owner(
        &self,
        sessions: &[(String, usize)],
        n: usize,
        threads: usize,
    ) -> usize {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    scope.spawn(move || {
                        (t..n)
                            .step_by(threads)
                            .filter(|i| {
                                let (sid, owner) = &sessions[i * sessions.len() / n];
                                let r = self.get(&format!("/?sid={sid}"));
                                assert_eq!(r.status, 200, "{}", r.text());
                                r.worker == Some(*owner)
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        })
    }

    /// `n` clients that connect, stay silent for `silence`, then send a
    /// sid request each; returns how many their sid's owner answered.
    pub fn silent_clients_on_owner(
        &self,
        sessions: &[(String, usize)],
        n: usize,
        silence: Duration,
    ) -> usize {
        let silent: Vec<TcpStream> = (0..n)
            .map(|_| TcpStream::connect(self.addr).unwrap())
            .collect();
        std::thread::sleep(silence);
        let mut right = 0;
        for (i, mut s) in silent.into_iter().enumerate() {
            let (sid, owner) = &sessions[i % sessions.len()];
            let req = format!("GET /?sid={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).unwrap();
            let r = read_response(s);
            assert_eq!(r.status, 200);
            right += usize::from(r.worker == Some(*owner));
        }
        right
    }

    /// The control socket's `stats` answer, as name -> value.
    pub fn stats(&self) -> HashMap<String, String> {
        let line = control_line(&self.control, "stats");
        let body = line
            .strip_prefix("ok ")
            .unwrap_or_else(|| panic!("stats: {line}"));
        body.split(' ')
            .filter_map(|f| f.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.stats()[name].parse().unwrap()
    }

    /// pid of worker `i` as the supervisor sees it, if it is up.
    pub fn worker_pid(&self, i: usize) -> Option<u32> {
        let v = self.stats().remove(&format!("worker{i}"))?;
        v.strip_prefix("pid:")?.split(',').next()?.parse().ok()
    }

    /// The first line of sticky's log containing `what`, waiting for it
    /// (5 s).
    pub fn log_line(&self, what: &str) -> String {
        for _ in 0..500 {
            let log = self.log.lock().unwrap().clone();
            if let Some(line) = log.lines().find(|l| l.contains(what)) {
                return line.to_string();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no {what:?} in sticky's log:\n{}", self.log.lock().unwrap());
    }

    /// Waits until `f` holds, up to `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut f: impl FnMut(&Cluster) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens an Engine.IO session (handshake on its own connection) and
    /// returns its sid.
    pub fn engine_io_handshake(&self) -> String {
        let r = self.get("/socket.io/?EIO=4&transport=polling");
        assert_eq!(r.status, 200, "{}", r.text());
        open_packet_sid(&r.text())
    }

    /// Opens `sessions` Engine.IO sessions, each followed by `polls` polls
    /// on new connections; returns how many polls were refused (400: the
    /// worker that got it did not know the sid).
    pub fn refused_polls(&self, sessions: usize, polls: usize) -> usize {
        let mut refused = 0;
        for _ in 0..sessions {
            let sid = self.engine_io_handshake();
            for _ in 0..polls {
                let r = self.get(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}"));
                refused += usize::from(r.status == 400);
            }
        }
        refused
    }

    /// Starts `workers` Python workers that report what they were given:
    /// `script` (which calls `live_fds()` and ends with
    /// `write_report(lines)`, see `WORKER_REPORT_PY`) is written into
    /// `dir`. Returns the cluster and each worker's report.
    pub fn start_reporting(
        dir: &TempDir,
        workers: usize,
        extra: &[&str],
        script: &str,
        configure: impl FnOnce(&mut Command),
    ) -> (Cluster, Vec<HashMap<String, String>>) {
        let path = dir.0.join("report.py");
        std::fs::write(&path, format!("{WORKER_REPORT_PY}{script}")).unwrap();
        let python = python3_bin();
        let cluster = Cluster::start_custom(
            "127.0.0.1:0",
            workers,
            extra,
            &[
                python.to_str().unwrap(),
                path.to_str().unwrap(),
                dir.0.to_str().unwrap(),
            ],
            configure,
        );
        let reports = cluster.worker_reports(&dir.0, workers);
        (cluster, reports)
    }

    /// Waits (10 s each) for the `key=value` lines each worker `w` writes
    /// to `dir/worker-w` (`WORKER_REPORT_PY`'s `write_report`), and returns
    /// them, worker by worker.
    fn worker_reports(
        &self,
        dir: &std::path::Path,
        workers: usize,
    ) -> Vec<HashMap<String, String>> {
        let mut reports = Vec::new();
        for w in 0..workers {
            let path = dir.join(format!("worker-{w}"));
            let start = Instant::now();
            while !path.exists() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "worker {w} wrote no report\n{}",
                    self.log.lock().unwrap()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let report: HashMap<String, String> = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            println!("worker {w}: {report:?}");
            reports.push(report);
        }
        reports
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for exit (up to `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_ref()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        self.wait_exit(limit)
    }

    /// Waits for sticky to exit by itself (up to `limit`, then SIGKILL).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(15));
    }
}

/// Sends `sig` to `pid`; a failure (no such process) fails the test.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::kill(pid as i32, sig) },
        0,
        "kill({pid}, {sig})"
    );
}

/// True while `pid` exists (a zombie counts: it is not reaped yet).
pub fn process_exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as i32, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The state letter of /proc/<pid>/stat (R, S, T, Z...).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// What each open descriptor of process `pid` is (for failure messages).
pub fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Entries in the kernel map `name` held by process `pid` (found through
/// its descriptors, so other sticky instances do not count), for the hash
/// maps whose size can grow: `flows`, `placed_flows`, `sessions`.
pub fn map_entries(pid: u32, name: &str) -> usize {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapInfo};
    use sticky_common::{Decision, FlowKey, Placed, Session};
    let id = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo of the supervisor")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|id| id.trim().parse::<u32>().ok())
        })
        .find(|&id| MapInfo::from_id(id).is_ok_and(|i| i.name_as_str() == Some(name)))
        .unwrap_or_else(|| panic!("process {pid} holds no map named {name}"));
    let data = MapData::from_id(id).expect("opening the map by id");
    let count = |map: Map| -> usize {
        match name {
            "flows" => BpfHashMap::<_, FlowKey, Decision>::try_from(map).map(|m| m.keys().count()),
            "placed_flows" => {
                BpfHashMap::<_, FlowKey, Placed>::try_from(map).map(|m| m.keys().count())
            }
            "sessions" => BpfHashMap::<_, u64, Session>::try_from(map).map(|m| m.keys().count()),
            other => panic!("map_entries: {other} is not a hash map"),
        }
        .expect("reading the map")
    };
    match name {
        "flows" | "placed_flows" => count(Map::LruHashMap(data)),
        _ => count(Map::HashMap(data)),
    }
}

/// Prints a test's figures so that they show in `cargo xtask test`'s output
/// even when the test passes (libtest captures `println!`, not a direct
/// write to stderr).
/// Whether `setpriv` (util-linux), which the tests use to run a command as
/// another user or with other capabilities, is missing; says so once if it is.
pub fn setpriv_missing() -> bool {
    let missing = Command::new("setpriv").arg("--version").output().is_err();
    if missing {
        println!("setpriv (util-linux) not installed: skipped");
    }
    missing
}

pub fn report(line: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// How a command that ran to its end exited, and what it wrote on stderr.
pub struct Ran {
    pub status: ExitStatus,
    pub stderr: String,
}

/// Runs `cmd` (stdin and stdout /dev/null) to completion; a hang past
/// `limit` fails the test.
pub fn run_to_end(cmd: &mut Command, limit: Duration) -> Ran {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {limit:?}; stderr:\n{}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        status,
        stderr: reader.join().unwrap(),
    }
}

/// Runs `sticky <args>` to completion; a hang past `limit` fails the test.
pub fn run_sticky(args: &[&str], limit: Duration) -> Ran {
    run_to_end(Command::new(sticky_bin()).args(args), limit)
}

/// Exit status non-zero and stderr exactly one line, containing every one
/// of `words`: how sticky refuses bad input (printed under `case`).
pub fn assert_one_line(case: &str, ran: &Ran, words: &[&str]) {
    println!("{case}: {} -> {:?}", ran.status, ran.stderr);
    assert!(!ran.status.success(), "{case}: exit status {}", ran.status);
    assert_eq!(
        ran.stderr.lines().count(),
        1,
        "{case}: expected one line:\n{}",
        ran.stderr
    );
    for w in words {
        assert!(
            ran.stderr.contains(w),
            "{case}: `{w}` not in {}",
            ran.stderr
        );
    }
}

/// Sends one line on a new control connection, returns the answer line.
pub fn control_line(path: &std::path::Path, line: &str) -> String {
    let mut s = UnixStream::connect(path).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    answer.trim_end().to_owned()
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub worker: Option<usize>,
    pub pid: Option<u32>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a new TCP connection, response read to the end.
pub fn request(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: sticky\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body);
    s.write_all(&msg).expect("send request");
    read_response(s)
}

/// Reads a `Connection: close` response to EOF and parses it.
pub fn read_response(mut s: TcpStream) -> Response {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no response head in {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            )
        });
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut worker = None;
    let mut pid = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "x-sticky-worker" => worker = v.trim().parse().ok(),
            "x-sticky-pid" => pid = v.trim().parse().ok(),
            _ => {}
        }
    }
    Response {
        status,
        worker,
        pid,
        body: raw[split + 4..].to_vec(),
    }
}

/// The sid of an Engine.IO open packet (`0{"sid":"...",...}`).
pub fn open_packet_sid(text: &str) -> String {
    let start = text.find(r#""sid":""#).expect("open packet") + 7;
    text[start..start + text[start..].find('"').unwrap()].to_owned()
}

/// A session id like Engine.IO's: `len` bytes of [A-Za-z0-9_-].
pub fn random_sid(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
    let mut seed = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut seed[..len])
        .unwrap();
    seed[..len]
        .iter()
        .map(|b| ALPHABET[(*b as usize) % 64] as char)
        .collect()
}

/// A private temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "sticky-test-{}-{}",
            std::process::id(),
            random_sid(8)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private network namespace (`ip netns add`), deleted on drop, so a test
/// can change TCP sysctls without touching the host. `enter` moves the
/// calling thread into it (threads it spawns afterwards are in it too);
/// `configure` makes a `Command` (e.g. sticky) start inside it.
pub struct NetNs {
    pub name: String,
    file: std::fs::File,
}

impl NetNs {
    /// None (with the reason) when `ip netns` is not usable here.
    pub fn new(sysctls: &[(&str, &str)]) -> Result<NetNs, String> {
        let name = format!("sticky-test-{}", random_sid(8).replace(['_', '-'], "x"));
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["netns", "add", &name])?;
        let file = std::fs::File::open(format!("/run/netns/{name}"))
            .map_err(|e| format!("/run/netns/{name}: {e}"))?;
        let ns = NetNs { name, file };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        for (key, value) in sysctls {
            ip(&[
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ])?;
        }
        Ok(ns)
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace descriptor.
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Makes `cmd` start inside the namespace.
    pub fn configure(&self, cmd: &mut Command) {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        let fd = self.file.as_raw_fd();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// A TCP counter of the namespace (`/proc/net/netstat` or `snmp`), e.g.
    /// ("TcpExt", "SyncookiesSent"). Read from a thread inside it.
    pub fn tcp_counter(group: &str, name: &str) -> u64 {
        for file in [
            "/proc/thread-self/net/netstat",
            "/proc/thread-self/net/snmp",
        ] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(group)).collect();
            for pair in lines.chunks(2) {
                if let [names, values] = pair {
                    let names = names.split_whitespace();
                    if let Some((_, v)) = names
                        .zip(values.split_whitespace())
                        .find(|(n, _)| *n == name)
                    {
                        return v.parse().unwrap_or(0);
                    }
                }
            }
        }
        0
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Raises this process's RLIMIT_NOFILE soft limit to `want` (or the hard
/// limit); returns the soft limit in effect.
pub fn raise_nofile(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        if limit.rlim_cur < want {
            if limit.rlim_max < want && libc::geteuid() == 0 {
                limit.rlim_max = want;
            }
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// `path` itself if every directory above it lets others search it (so a
/// worker run as `nobody` can exec or read it), else a copy in `dir`
/// (made searchable): repositories under a private home directory.
pub fn reachable_by_others(path: &std::path::Path, dir: &TempDir) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let searchable = path.ancestors().skip(1).all(|d| {
        d.as_os_str().is_empty()
            || std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    });
    if searchable {
        return path.to_owned();
    }
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.0.join(path.file_name().unwrap());
    std::fs::copy(path, &copy).unwrap();
    copy
}

/// A TCP connection from `from` (port 0: the kernel picks one) to `to`,
/// `SO_REUSEADDR` so that a port used a moment ago can be bound again.
pub fn connect_from(from: std::net::SocketAddrV4, to: std::net::SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let std::net::SocketAddr::V4(to) = to else {
        panic!("IPv4 cluster expected")
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let one: libc::c_int = 1;
    // SAFETY: plain socket syscalls on a descriptor the TcpStream owns at once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let int = size_of::<libc::c_int>() as libc::socklen_t;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            int,
        );
        let (f, t) = (sockaddr(from), sockaddr(to));
        assert_eq!(
            libc::bind(fd, (&raw const f).cast(), len),
            0,
            "bind {from}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(
            libc::connect(fd, (&raw const t).cast(), len),
            0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
        stream
    }
}
