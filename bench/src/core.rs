//! Load generator for `cargo xtask bench`.
//!
//! It answers two questions, each against the floor, the same listeners
//! balanced at SYN time with no stickiness at all (`sticky run --placement
//! syn`, which also attaches no session learner):
//!
//! - what does sticky placement cost per connection? Short
//!   Engine.IO-polling-like requests, one new connection each
//!   (`Connection: close`), timed from connect to the last byte of the
//!   response; from one client, then from `--clients` concurrent ones. A
//!   response from a worker other than the sid's owner counts as "wrong
//!   worker": ~0 expected for sticky, ~1/2 for the floor with two workers.
//! - what does sticky cost once a connection is established? Each client
//!   opens one keep-alive connection and sends requests on it back to back,
//!   each timed from its write to the last byte of its response; one client,
//!   then `ESTABLISHED_CLIENTS`, all pinned with sticky and its workers to
//!   one CPU (`Pinning` says why). Nothing of sticky should be on this path
//!   but the session learner (`sticky_learn`, on every egress packet of
//!   sticky's cgroup), so sticky should equal the floor; `--learn off` is
//!   the control.
//!
//! Both modes run in the same process run, alternating round by round
//! (sticky, floor, sticky, floor, ...) so that drift of the machine
//! (thermal, other load) cancels out of the ratios. In each round, each
//! mode starts one `sticky run` with two demo workers for the established
//! workloads, then a fresh one for the new-connection workloads, after
//! registering sessions through it (`/register?sid=`). The sticky column
//! uses sticky's default options (learning on).
//!
//! Plain threads and blocking sockets keep the client simple and its own
//! overhead constant between the two modes; only libc is needed (signals).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::http::{exchange, Conn, Response};

mod foreign;
mod ws_learn;

const WORKERS: usize = 2;
/// Sessions registered per worker, so requests spread over several sids.
const SIDS_PER_WORKER: usize = 3;
/// Concurrent clients of the established-connection workload (one
/// keep-alive connection each).
const ESTABLISHED_CLIENTS: usize = 8;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str = "usage: sticky-bench [--quick] [--rounds N] [--duration SECS] [--clients N]
                    [--learn on|off] [--json PATH] [--readme PATH] [--sticky PATH]
                    [--worker PATH] [--direct ADDR] [--ws-learn] [--foreign]

  --quick          1 round of 1 s per workload (default: 3 rounds of 3 s)
  --rounds N       rounds per mode; modes alternate sticky, floor, sticky, ...
  --duration SECS  length of each workload in each round
  --clients N      concurrent clients, one new connection per request
                   (default 64; the established workload uses 8)
  --learn on|off   session learning in the sticky column (default on, sticky's
                   default); off is a control: nothing of sticky is left on
                   established connections, so those rows should read 1.00
  --json PATH      also write the results as JSON
  --readme PATH    also write the tables between the bench markers of PATH
  --sticky PATH    sticky binary (default: `sticky` next to this executable)
  --worker PATH    worker binary (default: `sticky-demo-worker` next to it)
  --direct ADDR    debug: start nothing, measure a server already listening
                   at ADDR in both columns (checks the harness itself)
  --ws-learn       instead: Socket.IO messages over established WebSockets,
                   sticky --learn on vs off (plain socketioxide workers;
                   JSON in <json stem>-ws-learn.json)
  --foreign        instead: the foreign-request check's cost (WebSocket echo,
                   keep-alive long-polling; --foreign-requests reset vs off),
                   Connection: close per poll, and a reset request's resend
                   (JSON in <json stem>-foreign.json)";

/// `sticky-bench core ARGS`.
pub fn main(args: Vec<String>) {
    let result = parse_args(args).and_then(|opts| run(&opts));
    if let Err(e) = result {
        eprintln!("sticky-bench: {e}");
        std::process::exit(1);
    }
}

#[derive(Clone)]
struct Opts {
    sticky: PathBuf,
    worker: PathBuf,
    rounds: usize,
    duration: Duration,
    clients: usize,
    json: Option<PathBuf>,
    readme: Option<PathBuf>,
    direct: Option<SocketAddr>,
    learn: bool,
    /// Run only the WebSocket learn on/off comparison (`ws_learn`).
    ws_learn: bool,
    /// A cgroup v2 directory to start sticky in (`ws_learn`).
    cgroup: Option<PathBuf>,
    /// Run only the foreign-request comparison (`foreign`).
    foreign_bench: bool,
    /// `--foreign-requests` for sticky (None: its default).
    foreign: Option<&'static str>,
}

fn parse_args(args: Vec<String>) -> Result<Opts, String> {
    let exe_dir = crate::exe_dir();
    let mut opts = Opts {
        sticky: exe_dir.join("sticky"),
        worker: exe_dir.join("sticky-demo-worker"),
        rounds: 3,
        duration: Duration::from_secs(3),
        clients: 64,
        json: None,
        readme: None,
        direct: None,
        learn: true,
        ws_learn: false,
        cgroup: None,
        foreign_bench: false,
        foreign: None,
    };
    let (mut rounds, mut duration) = (None, None);
    let mut quick = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => quick = true,
            "--ws-learn" => opts.ws_learn = true,
            "--foreign" => opts.foreign_bench = true,
            "--rounds" => rounds = Some(number(&value("--rounds")?)? as usize),
            "--duration" => {
                duration = Some(Duration::from_secs_f64(number(&value("--duration")?)?))
            }
            "--clients" => opts.clients = number(&value("--clients")?)? as usize,
            "--json" => opts.json = Some(value("--json")?.into()),
            "--readme" => opts.readme = Some(value("--readme")?.into()),
            "--sticky" => opts.sticky = value("--sticky")?.into(),
            "--worker" => opts.worker = value("--worker")?.into(),
            "--learn" => {
                opts.learn = match value("--learn")?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => return Err(format!("--learn takes on or off, not {other:?}")),
                }
            }
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

/// How a workload's clients talk to the cluster.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// One new connection per request, closed by the server: what placement
    /// costs.
    NewConnection,
    /// One keep-alive connection per client, requests back to back: what
    /// sticky costs once placement is done.
    Established,
}

struct Workload {
    /// Row label in the tables.
    name: String,
    /// Key in the JSON output.
    key: &'static str,
    kind: Kind,
    clients: usize,
}

/// Every workload, in table order.
fn workloads(opts: &Opts) -> Vec<Workload> {
    vec![
        Workload {
            name: "serial".into(),
            key: "serial",
            kind: Kind::NewConnection,
            clients: 1,
        },
        Workload {
            name: format!("{} clients", opts.clients),
            key: "concurrent",
            kind: Kind::NewConnection,
            clients: opts.clients,
        },
        Workload {
            name: "established, serial".into(),
            key: "established_serial",
            kind: Kind::Established,
            clients: 1,
        },
        Workload {
            name: format!("established, {ESTABLISHED_CLIENTS} clients"),
            key: "established_concurrent",
            kind: Kind::Established,
            clients: ESTABLISHED_CLIENTS,
        },
    ]
}

/// Measurements of one workload in one mode, accumulated over rounds.
#[derive(Default)]
pub(crate) struct Stats {
    /// Request times (see `Kind`), nanoseconds.
    pub latencies: Vec<u64>,
    /// Connections opened (in the timed loop and for its set-up).
    pub connections: u64,
    pub errors: u64,
    pub wrong_worker: u64,
    /// The `latencies` of answers from the right worker, where a workload
    /// tells them apart (the peers' new-connection workloads): a wrong
    /// worker's answer may be cheaper than a right one's.
    pub right_latencies: Vec<u64>,
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

impl Stats {
    pub fn merge(&mut self, other: Stats) {
        self.latencies.extend(other.latencies);
        self.right_latencies.extend(other.right_latencies);
        self.connections += other.connections;
        self.errors += other.errors;
        self.wrong_worker += other.wrong_worker;
        self.elapsed += other.elapsed;
        self.first_error = self.first_error.take().or(other.first_error);
    }
    pub fn fail(&mut self, why: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(why);
        }
    }
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Percentile in microseconds; `latencies` must be sorted.
    pub fn percentile_us(&self, q: f64) -> f64 {
        percentile_us(&self.latencies, q)
    }
}

/// Percentile of `sorted` (nanoseconds) in microseconds; NaN if empty.
pub(crate) fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

/// One workload's results in both modes.
struct Measured {
    workload: Workload,
    sticky: Stats,
    floor: Stats,
}

impl Measured {
    fn mode_mut(&mut self, mode: Mode) -> &mut Stats {
        match mode {
            Mode::Sticky => &mut self.sticky,
            Mode::Floor => &mut self.floor,
        }
    }
}

struct Results {
    workloads: Vec<Measured>,
    /// Whether the session learner was attached in every sticky round
    /// (None: unknown, e.g. `--direct`; Some(false) with `--learn off`).
    sticky_learning: Option<bool>,
    /// How the established workloads were pinned, for the report.
    pinning: Option<String>,
    /// Other `sticky run` processes seen at the start or the end.
    others: Vec<u32>,
}

fn run(opts: &Opts) -> Result<(), String> {
    if opts.foreign_bench {
        return foreign::run(opts);
    }
    if opts.ws_learn {
        return ws_learn::run(opts);
    }
    if opts.direct.is_none() {
        for (what, path) in [("sticky", &opts.sticky), ("worker", &opts.worker)] {
            if !path.is_file() {
                return Err(format!("{what} binary {} not found (build with `cargo xtask build`, or pass --{what} PATH)", path.display()));
            }
        }
    }
    let mut results = Results {
        workloads: workloads(opts)
            .into_iter()
            .map(|workload| Measured {
                workload,
                sticky: Stats::default(),
                floor: Stats::default(),
            })
            .collect(),
        sticky_learning: (!opts.learn).then_some(false),
        pinning: None,
        others: other_stickies(),
    };
    warn_others(&results.others);
    let pinning = match opts.direct {
        Some(_) => None,
        None => Pinning::pick(),
    };
    results.pinning = pinning.as_ref().map(Pinning::describe);
    for round in 1..=opts.rounds {
        for mode in [Mode::Sticky, Mode::Floor] {
            let mut line = format!("round {round}/{} {:6}:", opts.rounds, mode.label());
            // Each kind gets its own cluster: established connections are
            // measured with clients and server pinned to one CPU (`Pinning`),
            // new connections as before, unpinned. Established first: on a
            // fresh cluster, not right after this mode's burst of short
            // connections (worker threads exiting, TIME_WAIT sockets).
            for kind in [Kind::Established, Kind::NewConnection] {
                let pins = match kind {
                    Kind::Established => pinning.as_ref(),
                    Kind::NewConnection => None,
                };
                let cluster = match opts.direct {
                    Some(_) => None,
                    None => Some(Cluster::start(opts, mode, pins.map(Pinning::cpus))?),
                };
                if let (Some(c), Mode::Sticky, true) = (&cluster, mode, opts.learn) {
                    let learning = c.learning();
                    if learning == Some(false) {
                        eprintln!(
                            "warning: sticky runs without its session learner:\n{}",
                            c.log_tail()
                        );
                    }
                    results.sticky_learning = match (round, kind, results.sticky_learning, learning)
                    {
                        (1, Kind::Established, _, l) => l,
                        (_, _, Some(a), Some(b)) => Some(a && b),
                        _ => None,
                    };
                }
                let addr = cluster
                    .as_ref()
                    .map_or_else(|| opts.direct.unwrap(), |c| c.addr);
                let sessions = match kind {
                    Kind::NewConnection => register(addr, opts.direct.is_some())?,
                    Kind::Established => Vec::new(),
                };
                for measured in results.workloads.iter_mut() {
                    let w = &measured.workload;
                    if w.kind != kind {
                        continue;
                    }
                    let mut stats = match kind {
                        Kind::NewConnection => {
                            run_new_connections(addr, &sessions, w.clients, opts.duration)
                        }
                        Kind::Established => {
                            run_established(addr, w.clients, opts.duration, pins.map(Pinning::cpus))
                        }
                    };
                    stats.latencies.sort_unstable();
                    line += &format!(
                        " {} {} req p50 {:.1} µs ({} errors);",
                        w.name,
                        stats.latencies.len(),
                        stats.percentile_us(0.50),
                        stats.errors
                    );
                    measured.mode_mut(mode).merge(stats);
                }
                if let Some(cluster) = cluster {
                    cluster.check_alive()?;
                }
            }
            eprintln!("{}", line.trim_end_matches(';'));
        }
    }
    for m in &mut results.workloads {
        for (mode, s) in [("sticky", &mut m.sticky), ("floor", &mut m.floor)] {
            s.latencies.sort_unstable();
            if let Some(e) = &s.first_error {
                eprintln!("first error ({}, {mode}): {e}", m.workload.name);
            }
        }
    }
    let seen = results.others.len();
    for pid in other_stickies() {
        if !results.others.contains(&pid) {
            results.others.push(pid);
        }
    }
    if results.others.len() > seen {
        warn_others(&results.others[seen..]);
    }
    let report = table(opts, &results);
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
    /// `cpus`: if given, sticky and its workers (which inherit it) run
    /// only there (sticky's sorter threads still pin themselves to their
    /// own CPU each).
    fn start(opts: &Opts, mode: Mode, cpus: Option<&[usize]>) -> Result<Cluster, String> {
        let port = crate::servers::free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut command = Command::new(&opts.sticky);
        if let Some(cpus) = cpus {
            let set = cpu_set(cpus);
            // SAFETY: sched_setaffinity is a plain syscall, safe between
            // fork and exec; `set` is a copy owned by the closure.
            unsafe {
                command.pre_exec(move || {
                    if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(dir) = &opts.cgroup {
            let procs = std::ffi::CString::new(
                dir.join("cgroup.procs")
                    .into_os_string()
                    .into_encoded_bytes(),
            )
            .map_err(|_| format!("bad cgroup path {}", dir.display()))?;
            // SAFETY: open/write/close are plain syscalls, safe between fork
            // and exec; `procs` is owned by the closure. Writing "0" moves
            // the writer (sticky-to-be) into that cgroup.
            unsafe {
                command.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(fd);
                    Ok(())
                });
            }
        }
        let mut child = command
            .args([
                "run",
                "--listen",
                &addr.to_string(),
                "--workers",
                &WORKERS.to_string(),
            ])
            .args(["--placement", mode.placement()])
            .args(match (mode, opts.learn) {
                (Mode::Sticky, false) => &["--learn", "off"][..],
                _ => &[],
            })
            .args(
                opts.foreign
                    .map(|f| ["--foreign-requests", f])
                    .iter()
                    .flatten(),
            )
            .arg("--")
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

    /// Whether sticky attached its session learner, from its log: it says
    /// "session learning is off" before "listening on" when it could not.
    /// None if the log does not tell (within 2 s).
    fn learning(&self) -> Option<bool> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            {
                let log = self.log.lock().unwrap();
                if log.iter().any(|l| l.contains("session learning is off")) {
                    return Some(false);
                }
                if log.iter().any(|l| l.contains("listening on")) {
                    return Some(true);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
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

/// Pids of `sticky run` processes other than this benchmark's own (which
/// are its children). Their session learners, attached to their cgroup,
/// may run on this benchmark's packets too, in both columns.
pub(crate) fn other_stickies() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|&b| b == 0);
            let is_sticky = args
                .next()
                .is_some_and(|a| a == b"sticky" || a.ends_with(b"/sticky"));
            let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid ...: comm may hold spaces.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            is_sticky && args.next() == Some(b"run") && parent != Some(me)
        })
        .collect();
    pids.sort_unstable();
    pids
}

pub(crate) fn warn_others(pids: &[u32]) {
    if !pids.is_empty() {
        eprintln!("note: other `sticky run` processes are running (pids {pids:?}): their session learners (on their cgroup and below) may run on this benchmark's packets in both columns, and their load adds noise");
    }
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
        let owner = worker(&resp).ok_or("/register response has no X-Sticky-Worker")?;
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

/// Runs `clients` threads side by side (on `cpus` if given), each running
/// `client(index, barrier)`, which sets up, waits at the barrier, then
/// measures.
pub(crate) fn run_clients(
    clients: usize,
    cpus: Option<&[usize]>,
    client: impl Fn(usize, &Barrier) -> Stats + Sync,
) -> Stats {
    let barrier = Barrier::new(clients);
    let per_thread: Vec<Stats> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|t| {
                let (barrier, client) = (&barrier, &client);
                scope.spawn(move || {
                    if let Some(cpus) = cpus {
                        if let Err(e) = pin(cpus) {
                            let mut stats = Stats::default();
                            stats.fail(format!("cannot pin a client to CPUs {cpus:?}: {e}"));
                            // Still at the barrier, or the others wait forever.
                            barrier.wait();
                            return stats;
                        }
                    }
                    client(t, barrier)
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

/// `clients` threads, each doing one request per new connection in a loop,
/// for `duration`; a request is timed from connect to its last byte.
fn run_new_connections(
    addr: SocketAddr,
    sessions: &[Session],
    clients: usize,
    duration: Duration,
) -> Stats {
    run_clients(clients, None, |t, barrier| {
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
        // A random sid per request: cycling through them in order could line
        // up with a round-robin balancer and hide the floor's misplacements.
        let mut rng = Rng::seeded(t as u64);
        while start.elapsed() < duration {
            let i = (rng.next() % sessions.len() as u64) as usize;
            let session = &sessions[i];
            let begin = Instant::now();
            stats.connections += 1;
            match exchange(addr, None, &requests[i]) {
                Ok(r) if r.status == 200 => {
                    stats.latencies.push((r.complete - begin).as_nanos() as u64);
                    if session.owner.is_some() && worker(&r) != session.owner {
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
}

/// `clients` threads, each with one keep-alive connection opened (and used
/// once) before the clock starts, sending requests on it back to back for
/// `duration`; a request is timed from its write to its last byte. A
/// connection that fails is replaced (counted as an error).
fn run_established(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    cpus: Option<&[usize]>,
) -> Stats {
    const REQUEST: &[u8] = b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n";
    run_clients(clients, cpus, |_, barrier| {
        let mut stats = Stats::default();
        // A Conn connects at its first request (and would reconnect by
        // itself: a failed one is dropped and replaced, counted).
        let open = |stats: &mut Stats| -> Option<Conn> {
            stats.connections += 1;
            Some(Conn::new(addr, None))
        };
        // The first request waits for the worker to accept the connection
        // (and start its thread): not an established round trip.
        let mut conn = open(&mut stats).and_then(|mut c| match c.request(REQUEST) {
            Ok(r) if r.status == 200 => Some(c),
            Ok(r) => {
                stats.fail(format!("first request: status {}", r.status));
                None
            }
            Err(e) => {
                stats.fail(format!("first request: {e}"));
                None
            }
        });
        barrier.wait();
        let start = Instant::now();
        while start.elapsed() < duration {
            let Some(c) = conn.as_mut() else {
                conn = open(&mut stats);
                continue;
            };
            let begin = Instant::now();
            match c.request(REQUEST) {
                Ok(r) if r.status == 200 => {
                    stats.latencies.push((r.complete - begin).as_nanos() as u64)
                }
                Ok(r) => stats.fail(format!("status {}", r.status)),
                Err(e) => {
                    stats.fail(e.to_string());
                    conn = None;
                }
            }
        }
        stats.elapsed = start.elapsed();
        stats
    })
}

fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    exchange(
        addr,
        None,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// The worker that answered, as the demo worker names itself.
fn worker(r: &Response) -> Option<String> {
    r.header("x-sticky-worker").map(str::to_string)
}

/// Where the established workloads run: clients, sticky and its workers
/// all on one CPU (the last this process may use; the others are left to
/// the rest of the machine).
///
/// Unpinned, a keep-alive round trip took 13 or 48 µs (2 vCPUs) depending
/// on whether the scheduler put the worker's thread on the client's CPU, a
/// choice that held for a whole connection. Pinned to two different CPUs,
/// every round trip paid a cross-CPU wake-up of an idle vCPU, whose cost
/// varied by ±10% from round to round with the host's load. Both swamp the
/// few percent to measure. On one CPU a round trip is CPU work only, and
/// whatever sticky adds to it shows in full.
struct Pinning {
    cpu: usize,
}

impl Pinning {
    fn pick() -> Option<Pinning> {
        // SAFETY: a zeroed cpu_set_t is valid; the kernel fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } < 0 {
            return None;
        }
        (0..libc::CPU_SETSIZE as usize)
            .rfind(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .map(|cpu| Pinning { cpu })
    }

    fn cpus(&self) -> &[usize] {
        std::slice::from_ref(&self.cpu)
    }

    fn describe(&self) -> String {
        format!(
            "clients, sticky and its workers all pinned to CPU {}",
            self.cpu
        )
    }
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for
    // CPUs below CPU_SETSIZE (those come from sched_getaffinity).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// Pins the calling thread to `cpus`.
fn pin(cpus: &[usize]) -> io::Result<()> {
    let set = cpu_set(cpus);
    // SAFETY: plain syscall on the calling thread with a valid set.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// xorshift64*: enough to make sids unique, no dependency needed.
pub(crate) struct Rng(pub u64);

impl Rng {
    /// Seeded from the clock and pid; `stream` separates threads started
    /// in the same nanosecond.
    pub fn seeded(stream: u64) -> Rng {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let pid = u64::from(std::process::id()) << 32;
        let mut rng = Rng((t ^ pid ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
        rng.next();
        rng
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// 20 characters of the base64url alphabet, like Engine.IO's ids.
    pub fn sid(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..20)
            .map(|_| ALPHABET[(self.next() >> 58) as usize] as char)
            .collect()
    }
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// sticky/floor ratios of p50, p99 and rate.
fn ratios(m: &Measured) -> [f64; 3] {
    let (s, f) = (&m.sticky, &m.floor);
    [
        ratio(s.percentile_us(0.50), f.percentile_us(0.50)),
        ratio(s.percentile_us(0.99), f.percentile_us(0.99)),
        ratio(s.rate(), f.rate()),
    ]
}

fn table(opts: &Opts, r: &Results) -> String {
    let mut out = String::new();
    let target = match opts.direct {
        Some(addr) => format!("direct to {addr} in both columns (harness check)"),
        None => format!(
            "{WORKERS} demo workers, sticky with {}",
            match r.sticky_learning {
                Some(true) => "its defaults (session learning on)",
                Some(false) if !opts.learn => "--learn off (control run)",
                Some(false) => "session learning OFF (the learner could not be attached)",
                None => "its defaults (session learning: not confirmed by its log)",
            }
        ),
    };
    let names = |kind: Kind| {
        let names: Vec<&str> = r
            .workloads
            .iter()
            .filter(|m| m.workload.kind == kind)
            .map(|m| m.workload.name.as_str())
            .collect();
        names.join(" and ")
    };
    out += &format!(
        "\n## sticky placement vs SYN-time balancing (floor)\n\n{target}; {} round(s) of {:.1} s per workload and mode, alternating.\n\n- {}: one new connection per request, timed from connect to the response's last byte.\n- {}: one keep-alive connection per client, opened before the clock starts; requests back to back, each timed from its write to the response's last byte; {}.\n\n",
        opts.rounds,
        opts.duration.as_secs_f64(),
        names(Kind::NewConnection),
        names(Kind::Established),
        r.pinning.as_deref().unwrap_or("unpinned"),
    );
    out += "| workload | mode | requests | rate (req/s) | p50 (µs) | p99 (µs) | max (µs) | errors | wrong worker |\n";
    out += "|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for m in &r.workloads {
        for (mode, s) in [("sticky", &m.sticky), ("floor", &m.floor)] {
            // Established requests carry no sid: no owner to check.
            let wrong = match m.workload.kind {
                Kind::NewConnection => s.wrong_worker.to_string(),
                Kind::Established => "-".into(),
            };
            out += &format!(
                "| {} | {mode} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {wrong} |\n",
                m.workload.name,
                s.latencies.len(),
                s.rate(),
                s.percentile_us(0.50),
                s.percentile_us(0.99),
                s.percentile_us(1.0),
                s.errors,
            );
        }
    }
    out += "\n| workload | p50 sticky/floor | p99 sticky/floor | rate sticky/floor |\n|---|---:|---:|---:|\n";
    for m in &r.workloads {
        let [p50, p99, rate] = ratios(m);
        out += &format!(
            "| {} | {p50:.3} | {p99:.3} | {rate:.3} |\n",
            m.workload.name
        );
    }
    out
}

/// Replaces what sits between the README's bench markers with `report`.
fn update_readme(path: &Path, report: &str) -> Result<(), String> {
    replace_between_markers(path, "<!-- bench:begin -->", "<!-- bench:end -->", report)
}

/// Replaces what sits between `begin` and `end` in `path` with a stamp
/// (machine, CPUs) and `report`, its first heading one level down.
fn replace_between_markers(
    path: &Path,
    begin: &str,
    end: &str,
    report: &str,
) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (Some(a), Some(b)) = (text.find(begin), text.find(end)) else {
        return Err(format!("{} has no {begin} / {end} markers", path.display()));
    };
    let machine = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let stamp = format!(
        "\nMeasured by `cargo xtask bench` on {cpus} CPUs, Linux {}; ratios are what to compare (absolute times drift on shared machines).\n\n",
        machine.trim()
    );
    let new = format!(
        "{}{begin}\n{stamp}{}\n{}",
        &text[..a],
        report.trim_start_matches('\n').replacen("## ", "### ", 1),
        &text[b..]
    );
    std::fs::write(path, new).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// JSON by hand: a handful of numbers does not justify serde. One key per
/// workload (`Workload::key`); `conns` counts connections opened, equal to
/// `requests` for the new-connection workloads.
fn json(opts: &Opts, r: &Results) -> String {
    let num = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "null".into()
        }
    };
    let stats = |s: &Stats, kind: Kind| {
        let wrong = match kind {
            Kind::NewConnection => s.wrong_worker.to_string(),
            Kind::Established => "null".into(),
        };
        format!(
            "{{\"requests\": {}, \"conns\": {}, \"seconds\": {}, \"rate\": {}, \"p50_us\": {}, \"p99_us\": {}, \"max_us\": {}, \"errors\": {}, \"wrong_worker\": {wrong}}}",
            s.latencies.len(),
            s.connections,
            num(s.elapsed.as_secs_f64()),
            num(s.rate()),
            num(s.percentile_us(0.50)),
            num(s.percentile_us(0.99)),
            num(s.percentile_us(1.0)),
            s.errors,
        )
    };
    let workloads: Vec<String> = r
        .workloads
        .iter()
        .map(|m| {
            let w = &m.workload;
            let [p50, p99, rate] = ratios(m);
            format!(
                "  \"{}\": {{\n      \"name\": {},\n      \"kind\": \"{}\",\n      \"clients\": {},\n      \"sticky\": {},\n      \"floor\": {},\n      \"ratio\": {{\"p50\": {}, \"p99\": {}, \"rate\": {}}}\n    }}",
                w.key,
                quote(&w.name),
                match w.kind {
                    Kind::NewConnection => "new_connection",
                    Kind::Established => "established",
                },
                w.clients,
                stats(&m.sticky, w.kind),
                stats(&m.floor, w.kind),
                num(p50),
                num(p99),
                num(rate)
            )
        })
        .collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!(
        "{{\n  \"unix_time\": {unix_time},\n  \"kernel\": {},\n  \"cpus\": {cpus},\n  \"direct\": {},\n  \"workers\": {WORKERS},\n  \"sticky_learning\": {},\n  \"established_pinning\": {},\n  \"other_sticky_pids\": {:?},\n  \"rounds\": {},\n  \"seconds_per_round\": {},\n  \"clients\": {},\n{}\n}}\n",
        quote(kernel.trim()),
        opts.direct.map_or("null".into(), |a| quote(&a.to_string())),
        r.sticky_learning.map_or("null".into(), |l| l.to_string()),
        r.pinning.as_deref().map_or("null".into(), quote),
        r.others,
        opts.rounds,
        num(opts.duration.as_secs_f64()),
        opts.clients,
        workloads.join(",\n")
    )
}

pub(crate) fn quote(s: &str) -> String {
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
