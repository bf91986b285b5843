//! Load generator for `cargo xtask bench`.
//!
//! It answers one question: what does sticky placement cost per connection
//! compared with the floor, the same listeners balanced at SYN time with no
//! stickiness at all (`sticky run --placement syn`)? Both modes run in the
//! same process run, alternating round by round (sticky, floor, sticky,
//! floor, ...) so that drift of the machine (thermal, other load) cancels
//! out of the ratios.
//!
//! Each round starts its own `sticky run` with two demo workers, registers
//! sessions through the cluster (`/register?sid=`), then measures
//! connect-to-response-complete time of short Engine.IO-polling-like
//! requests (one new connection each, `Connection: close`), first from one
//! client, then from 64 concurrent clients. A response from a worker other
//! than the sid's owner counts as "wrong worker": ~0 expected for sticky,
//! ~1/2 for the floor with two workers.
//!
//! Plain threads and blocking sockets keep the client simple and its own
//! overhead constant between the two modes; only libc is needed (signals).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WORKERS: usize = 2;
/// Sessions registered per worker, so requests spread over several sids.
const SIDS_PER_WORKER: usize = 3;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str = "usage: sticky-bench [--quick] [--rounds N] [--duration SECS] [--clients N]
                    [--json PATH] [--readme PATH] [--sticky PATH] [--worker PATH] [--direct ADDR]

  --quick          1 round of 1 s per workload (default: 3 rounds of 3 s)
  --rounds N       rounds per mode; modes alternate sticky, floor, sticky, ...
  --duration SECS  length of each workload in each round
  --clients N      concurrent clients (default 64)
  --json PATH      also write the results as JSON
  --readme PATH    also write the tables between the bench markers of PATH
  --sticky PATH    sticky binary (default: `sticky` next to this executable)
  --worker PATH    worker binary (default: `sticky-demo-worker` next to it)
  --direct ADDR    debug: start nothing, measure a server already listening
                   at ADDR in both columns (checks the harness itself)";

fn main() {
    let result = parse_args().and_then(|opts| run(&opts));
    if let Err(e) = result {
        eprintln!("sticky-bench: {e}");
        std::process::exit(1);
    }
}

struct Opts {
    sticky: PathBuf,
    worker: PathBuf,
    rounds: usize,
    duration: Duration,
    clients: usize,
    json: Option<PathBuf>,
    readme: Option<PathBuf>,
    direct: Option<SocketAddr>,
}

fn parse_args() -> Result<Opts, String> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut opts = Opts {
        sticky: exe_dir.join("sticky"),
        worker: exe_dir.join("sticky-demo-worker"),
        rounds: 3,
        duration: Duration::from_secs(3),
        clients: 64,
        json: None,
        readme: None,
        direct: None,
    };
    let (mut rounds, mut duration) = (None, None);
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => quick = true,
            "--rounds" => rounds = Some(number(&value("--rounds")?)? as usize),
            "--duration" => {
                duration = Some(Duration::from_secs_f64(number(&value("--duration")?)?))
            }
            "--clients" => opts.clients = number(&value("--clients")?)? as usize,
            "--json" => opts.json = Some(value("--json")?.into()),
            "--readme" => opts.readme = Some(value("--readme")?.into()),
            "--sticky" => opts.sticky = value("--sticky")?.into(),
            "--worker" => opts.worker = value("--worker")?.into(),
            "--direct" => {
                let addr = value("--direct")?;
                let resolved = addr.to_socket_addrs().ok().and_then(|mut a| a.next());
                opts.direct = Some(resolved.ok_or(format!("cannot resolve {addr}"))?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let (default_rounds, default_secs) = if quick { (1, 1.0) } else { (3, 3.0) };
    opts.rounds = rounds.unwrap_or(default_rounds).max(1);
    opts.duration = duration.unwrap_or(Duration::from_secs_f64(default_secs));
    opts.clients = opts.clients.max(1);
    Ok(opts)
}

fn number(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|n| *n > 0.0)
        .ok_or(format!("{s:?} is not a positive number"))
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Sticky,
    Floor,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Sticky => "sticky",
            Mode::Floor => "floor",
        }
    }
    /// Value of `sticky run --placement`.
    fn placement(self) -> &'static str {
        match self {
            Mode::Sticky => "sticky",
            Mode::Floor => "syn",
        }
    }
}

/// Measurements of one workload in one mode, accumulated over rounds.
#[derive(Default)]
struct Stats {
    /// Connect-to-response-complete times, nanoseconds.
    latencies: Vec<u64>,
    errors: u64,
    wrong_worker: u64,
    elapsed: Duration,
    first_error: Option<String>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.wrong_worker += other.wrong_worker;
        self.elapsed += other.elapsed;
        self.first_error = self.first_error.take().or(other.first_error);
    }
    fn fail(&mut self, why: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(why);
        }
    }
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Percentile in microseconds; `latencies` must be sorted.
    fn percentile_us(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank =
            ((q * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1] as f64 / 1000.0
    }
}

/// Per mode: [serial, concurrent].
struct Results {
    sticky: [Stats; 2],
    floor: [Stats; 2],
}

fn run(opts: &Opts) -> Result<(), String> {
    if opts.direct.is_none() {
        for (what, path) in [("sticky", &opts.sticky), ("worker", &opts.worker)] {
            if !path.is_file() {
                return Err(format!("{what} binary {} not found (build with `cargo xtask build`, or pass --{what} PATH)", path.display()));
            }
        }
    }
    let mut results = Results {
        sticky: Default::default(),
        floor: Default::default(),
    };
    for round in 1..=opts.rounds {
        for mode in [Mode::Sticky, Mode::Floor] {
            let cluster = match opts.direct {
                Some(_) => None,
                None => Some(Cluster::start(opts, mode)?),
            };
            let addr = cluster
                .as_ref()
                .map_or_else(|| opts.direct.unwrap(), |c| c.addr);
            let sessions = register(addr, opts.direct.is_some())?;
            let serial = run_clients(addr, &sessions, 1, opts.duration);
            let concurrent = run_clients(addr, &sessions, opts.clients, opts.duration);
            if let Some(cluster) = cluster {
                cluster.check_alive()?;
            }
            eprintln!(
                "round {round}/{} {:6}: serial {} conns ({} errors), {} clients {} conns ({} errors)",
                opts.rounds,
                mode.label(),
                serial.latencies.len(),
                serial.errors,
                opts.clients,
                concurrent.latencies.len(),
                concurrent.errors
            );
            let slot = match mode {
                Mode::Sticky => &mut results.sticky,
                Mode::Floor => &mut results.floor,
            };
            slot[0].merge(serial);
            slot[1].merge(concurrent);
        }
    }
    for stats in results.sticky.iter_mut().chain(results.floor.iter_mut()) {
        stats.latencies.sort_unstable();
    }
    for (mode, stats) in [("sticky", &results.sticky), ("floor", &results.floor)] {
        for s in stats {
            if let Some(e) = &s.first_error {
                eprintln!("first error ({mode}): {e}");
            }
        }
    }
    let workloads = ["serial".to_string(), format!("{} clients", opts.clients)];
    let report = table(opts, &workloads, &results);
    print!("{report}");
    if let Some(path) = &opts.readme {
        update_readme(path, &report)?;
        eprintln!("updated {}", path.display());
    }
    if let Some(path) = &opts.json {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        std::fs::write(path, json(opts, &results))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// A running `sticky run` with two demo workers, stopped on drop.
struct Cluster {
    child: Child,
    addr: SocketAddr,
    /// Last lines of sticky's stderr, shown if it fails to come up.
    log: Arc<Mutex<Vec<String>>>,
}

impl Cluster {
    fn start(opts: &Opts, mode: Mode) -> Result<Cluster, String> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut child = Command::new(&opts.sticky)
            .args([
                "run",
                "--listen",
                &addr.to_string(),
                "--workers",
                &WORKERS.to_string(),
            ])
            .args(["--placement", mode.placement(), "--"])
            .arg(&opts.worker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", opts.sticky.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        // Drain stderr so sticky never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut lines = io::BufRead::lines(io::BufReader::new(stderr));
            while let Some(Ok(line)) = lines.next() {
                let mut log = sink.lock().unwrap();
                if log.len() == 50 {
                    log.remove(0);
                }
                log.push(line);
            }
        });
        let mut cluster = Cluster { child, addr, log };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = cluster.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100)); // let the log drain
                return Err(format!(
                    "sticky exited ({status}) before serving:\n{}",
                    cluster.log_tail()
                ));
            }
            if get(addr, "/whoami").is_ok_and(|r| r.status == 200) {
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "sticky did not answer on {addr} within {STARTUP_TIMEOUT:?}:\n{}",
                    cluster.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Results are meaningless if sticky died during the round.
    fn check_alive(mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                std::thread::sleep(Duration::from_millis(100)); // let the log drain
                Err(format!(
                    "sticky exited during the round ({status}):\n{}",
                    self.log_tail()
                ))
            }
            _ => Ok(()),
        }
    }

    fn log_tail(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGTERM lets sticky stop its workers and detach its programs.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("sticky-bench: sticky did not stop within 10 s, killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let l =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// A registered session and the worker that owns it (None: unknown, in
/// `--direct` mode against a worker without a supervisor).
struct Session {
    sid: String,
    owner: Option<String>,
}

/// Registers fresh sids through the cluster until every worker owns
/// `SIDS_PER_WORKER` of them (which worker answers `/register` is the
/// balancer's choice, so keep trying).
fn register(addr: SocketAddr, direct: bool) -> Result<Vec<Session>, String> {
    let mut rng = Rng::seeded(0);
    let mut sessions: Vec<Session> = Vec::new();
    let mut owned = std::collections::BTreeMap::<String, usize>::new();
    for attempt in 0..500 {
        let full = owned.values().filter(|&&n| n >= SIDS_PER_WORKER).count();
        if full >= WORKERS {
            return Ok(sessions);
        }
        let sid = rng.sid();
        let resp =
            get(addr, &format!("/register?sid={sid}")).map_err(|e| format!("register: {e}"))?;
        if resp.status != 200 {
            let body = String::from_utf8_lossy(&resp.body).trim().to_string();
            if direct && attempt == 0 {
                eprintln!(
                    "note: /register answered {} ({body}); using unowned sids",
                    resp.status
                );
                let unowned = (0..WORKERS * SIDS_PER_WORKER).map(|_| Session {
                    sid: rng.sid(),
                    owner: None,
                });
                return Ok(unowned.collect());
            }
            return Err(format!(
                "/register?sid={sid} answered {}: {body}",
                resp.status
            ));
        }
        let owner = resp
            .worker
            .ok_or("/register response has no X-Sticky-Worker")?;
        let n = owned.entry(owner.clone()).or_default();
        if *n < SIDS_PER_WORKER {
            *n += 1;
            sessions.push(Session {
                sid,
                owner: Some(owner),
            });
        }
    }
    Err(format!("could not register {SIDS_PER_WORKER} sessions on each of {WORKERS} workers in 500 tries (owners seen: {owned:?})"))
}

/// Runs `clients` threads, each doing one request per new connection in a
/// loop, for `duration`.
fn run_clients(
    addr: SocketAddr,
    sessions: &[Session],
    clients: usize,
    duration: Duration,
) -> Stats {
    let barrier = Barrier::new(clients);
    let per_thread: Vec<Stats> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|t| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let requests: Vec<Vec<u8>> = sessions
                        .iter()
                        .map(|s| {
                            format!("GET /whoami?EIO=4&transport=polling&sid={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", s.sid)
                                .into_bytes()
                        })
                        .collect();
                    let mut stats = Stats::default();
                    barrier.wait();
                    let start = Instant::now();
                    // A random sid per request: cycling through them in
                    // order could line up with a round-robin balancer and
                    // hide the floor's misplacements.
                    let mut rng = Rng::seeded(t as u64);
                    while start.elapsed() < duration {
                        let i = (rng.next() % sessions.len() as u64) as usize;
                        let session = &sessions[i];
                        let begin = Instant::now();
                        match exchange(addr, &requests[i]) {
                            Ok(r) if r.status == 200 => {
                                stats.latencies.push((r.complete - begin).as_nanos() as u64);
                                if session.owner.is_some() && r.worker != session.owner {
                                    stats.wrong_worker += 1;
                                }
                            }
                            Ok(r) => stats.fail(format!("status {}", r.status)),
                            Err(e) => stats.fail(e.to_string()),
                        }
                    }
                    stats.elapsed = start.elapsed();
                    stats
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Threads ran side by side: the wall time is the longest one, not the sum.
    let elapsed = per_thread
        .iter()
        .map(|s| s.elapsed)
        .max()
        .unwrap_or_default();
    let mut total = Stats::default();
    for s in per_thread {
        total.merge(s);
    }
    total.elapsed = elapsed;
    total
}

struct Response {
    status: u16,
    /// When the last byte of the response arrived.
    complete: Instant,
    worker: Option<String>,
    body: Vec<u8>,
}

fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// One request on a new connection, read to the end of the response (by
/// Content-Length).
fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.write_all(request)?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let (mut worker, mut length) = (None, 0usize);
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        if name.eq_ignore_ascii_case("x-sticky-worker") {
            worker = Some(value.trim().to_string());
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value
                .trim()
                .parse()
                .map_err(|_| bad("bad Content-Length"))?;
        }
    }
    let mut body = buf.split_off(head_end);
    while body.len() < length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "response body cut short",
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let complete = Instant::now();
    // Wait for the server's FIN (it honours `Connection: close`) so that the
    // server, not this client, keeps the TIME_WAIT state: the client would
    // otherwise run out of ephemeral ports at high rates.
    while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
    Ok(Response {
        status,
        complete,
        worker,
        body,
    })
}

/// xorshift64*: enough to make sids unique, no dependency needed.
struct Rng(u64);

impl Rng {
    /// Seeded from the clock and pid; `stream` separates threads started
    /// in the same nanosecond.
    fn seeded(stream: u64) -> Rng {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let pid = u64::from(std::process::id()) << 32;
        let mut rng = Rng((t ^ pid ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
        rng.next();
        rng
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// 20 characters of the base64url alphabet, like Engine.IO's ids.
    fn sid(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..20)
            .map(|_| ALPHABET[(self.next() >> 58) as usize] as char)
            .collect()
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn table(opts: &Opts, workloads: &[String; 2], r: &Results) -> String {
    let mut out = String::new();
    let target = match opts.direct {
        Some(addr) => format!("direct to {addr} in both columns (harness check)"),
        None => format!("{WORKERS} demo workers"),
    };
    out += &format!(
        "\n## sticky placement vs SYN-time balancing (floor)\n\n{target}; {} round(s) of {:.1} s per workload and mode, alternating; one new connection per request.\n\n",
        opts.rounds,
        opts.duration.as_secs_f64()
    );
    out += "| workload | mode | conns | rate (conn/s) | p50 (µs) | p99 (µs) | max (µs) | errors | wrong worker |\n";
    out += "|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (w, name) in workloads.iter().enumerate() {
        for (mode, s) in [("sticky", &r.sticky[w]), ("floor", &r.floor[w])] {
            out += &format!(
                "| {name} | {mode} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} |\n",
                s.latencies.len(),
                s.rate(),
                s.percentile_us(0.50),
                s.percentile_us(0.99),
                s.percentile_us(1.0),
                s.errors,
                s.wrong_worker
            );
        }
    }
    out += "\n| workload | p50 sticky/floor | p99 sticky/floor | rate sticky/floor |\n|---|---:|---:|---:|\n";
    for (w, name) in workloads.iter().enumerate() {
        let (s, f) = (&r.sticky[w], &r.floor[w]);
        out += &format!(
            "| {name} | {:.2} | {:.2} | {:.2} |\n",
            ratio(s.percentile_us(0.50), f.percentile_us(0.50)),
            ratio(s.percentile_us(0.99), f.percentile_us(0.99)),
            ratio(s.rate(), f.rate())
        );
    }
    out
}

/// Replaces what sits between the README's bench markers with `report`.
fn update_readme(path: &Path, report: &str) -> Result<(), String> {
    const BEGIN: &str = "<!-- bench:begin -->";
    const END: &str = "<!-- bench:end -->";
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
        return Err(format!("{} has no {BEGIN} / {END} markers", path.display()));
    };
    let machine = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let stamp = format!(
        "\nMeasured by `cargo xtask bench` on {cpus} CPUs, Linux {}; ratios are what to compare (absolute times drift on shared machines).\n\n",
        machine.trim()
    );
    let new = format!(
        "{}{BEGIN}\n{stamp}{}\n{}",
        &text[..a],
        report.trim_start_matches('\n').replacen("## ", "### ", 1),
        &text[b..]
    );
    std::fs::write(path, new).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// JSON by hand: a handful of numbers does not justify serde.
fn json(opts: &Opts, r: &Results) -> String {
    let num = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "null".into()
        }
    };
    let stats = |s: &Stats| {
        format!(
            "{{\"conns\": {}, \"seconds\": {}, \"rate\": {}, \"p50_us\": {}, \"p99_us\": {}, \"max_us\": {}, \"errors\": {}, \"wrong_worker\": {}}}",
            s.latencies.len(),
            num(s.elapsed.as_secs_f64()),
            num(s.rate()),
            num(s.percentile_us(0.50)),
            num(s.percentile_us(0.99)),
            num(s.percentile_us(1.0)),
            s.errors,
            s.wrong_worker
        )
    };
    let workload = |w: usize| {
        let (s, f) = (&r.sticky[w], &r.floor[w]);
        format!(
            "{{\n      \"sticky\": {},\n      \"floor\": {},\n      \"ratio\": {{\"p50\": {}, \"p99\": {}, \"rate\": {}}}\n    }}",
            stats(s),
            stats(f),
            num(ratio(s.percentile_us(0.50), f.percentile_us(0.50))),
            num(ratio(s.percentile_us(0.99), f.percentile_us(0.99))),
            num(ratio(s.rate(), f.rate()))
        )
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!(
        "{{\n  \"unix_time\": {unix_time},\n  \"kernel\": {},\n  \"cpus\": {cpus},\n  \"direct\": {},\n  \"workers\": {WORKERS},\n  \"rounds\": {},\n  \"seconds_per_round\": {},\n  \"clients\": {},\n  \"serial\": {},\n  \"concurrent\": {}\n}}\n",
        quote(kernel.trim()),
        opts.direct.map_or("null".into(), |a| quote(&a.to_string())),
        opts.rounds,
        num(opts.duration.as_secs_f64()),
        opts.clients,
        workload(0),
        workload(1)
    )
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            c if (c as u32) < 0x20 => out += &format!("\\u{:04x}", c as u32),
            c => out.push(c),
        }
    }
    out + "\""
}
