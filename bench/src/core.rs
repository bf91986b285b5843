//! `sticky-bench core`: what placement itself costs, against the floor.
//!
//! The same two workers behind three placements, in one run, alternating
//! round by round (sticky, cookie, floor, sticky, ...) so that drift of a
//! shared machine cancels out of the ratios:
//!
//! - `sticky`: sticky's default placement, by sid, with sorting-listener
//!   rotation (the softirq and queue paths);
//! - `batch` (or `batch:WINDOW`, e.g. `batch:250us`): the default
//!   placement with `--rotation-batch WINDOW` (1ms if not given), at most
//!   one rotation per window on a busy CPU; not in the default modes;
//! - `cookie`: `--placement cookie`, every SYN answered with a SYN cookie
//!   and every connection placed by sid on its first data in softirq, no
//!   rotation;
//! - `floor`: the same listeners balanced at SYN time with no stickiness at
//!   all (`--placement syn`, which also attaches no session learner);
//! - `bpf-cookie` (only when `--modes` names it): `--placement bpf-cookie`,
//!   sticky's own SYN cookies from a tc program, placed like `cookie`.
//!
//! The workers are the fair-floor worker (`bench/workers/fair_worker.c`,
//! one thread, epoll, a few microseconds per request) unless `--worker`
//! names another: equally cheap in every column, so what differs is
//! placement.
//!
//! Workloads:
//! - new connections: sid-carrying requests, one new connection each
//!   (`Connection: close`), timed from connect to the response's last byte;
//!   serially, then from `--clients` concurrent clients; and "distance"
//!   rows whose clients wait 1 ms or 20 ms between `connect` and their first
//!   byte, as a client one round trip away does (netem is not available
//!   here). A response from another worker than the sid's owner counts as
//!   "wrong worker": 0 expected for sticky and cookie, ~1/2 for the floor.
//!   The supervisor's CPU time (user + system, /proc) over each workload
//!   is reported per 1,000 connections.
//! - established connections: each client opens one keep-alive connection
//!   and sends requests on it back to back, each timed from its write to
//!   the last byte of its response; one client, then `ESTABLISHED_CLIENTS`,
//!   all pinned with sticky and its workers to one CPU (`Pinning` says why).
//!   Nothing of sticky should be on this path but the session learner;
//!   `--learn off` is the control.
//! - memory (`memory.rs`, once, after the rounds): `--sessions` sessions
//!   registered over the control socket, then in a fresh cluster
//!   `--learned` sessions learned from Engine.IO handshakes; kernel map
//!   memory and the supervisor's RSS with them held.
//!
//! Plain threads and blocking sockets keep the client simple and its own
//! overhead constant between the modes; only libc is needed (signals).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host::{other_stickies, warn_others};
use crate::http::{exchange_after, Conn, Response};
use crate::measure::{cpu_set, run_clients, Rng, Stats};

mod cgroup;
mod delay_line;
mod foreign;
mod memory;
mod prog_time;
mod report;
mod ws_learn;

use report::update_readme;

const WORKERS: usize = 2;
/// Sessions registered per worker, so requests spread over several sids.
const SIDS_PER_WORKER: usize = 3;
/// Concurrent clients of the established-connection workload (one
/// keep-alive connection each).
const ESTABLISHED_CLIENTS: usize = 8;
/// Clients of the 1 ms delay-line workload.
const FAR_CLIENTS: usize = 16;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str =
    "usage: sticky-bench core [--quick] [--rounds N] [--duration SECS] [--clients N]
                    [--modes sticky,batch:1ms,cookie,floor,bpf-cookie] [--sessions N] [--learned N]
                    [--no-memory | --memory-only] [--learn on|off] [--json PATH] [--readme PATH]
                    [--sticky PATH] [--worker PATH] [--direct ADDR] [--ws-learn]
                    [--foreign]

  --quick          1 round of 1 s per workload, 100,000 learned sessions
                   (default: 3 rounds of 3 s, 1,000,000)
  --rounds N       rounds per mode; modes alternate
  --duration SECS  length of each workload in each round
  --clients N      concurrent clients, one new connection per request
                   (default 64; the established workload uses 8)
  --modes K,..     placements to compare: sticky, cookie, bpf-cookie (where
                   the kernel has its kfunc), floor (default: these),
                   batch[:WINDOW] (sticky --rotation-batch WINDOW, default
                   1ms; e.g. batch:250us,batch:2ms)
  --sessions N     sessions registered for the memory measurement
                   (default 1,000,000)
  --learned N      sessions learned for the memory measurement
  --no-memory      skip the memory measurement
  --memory-only    only the memory measurement (no placement rounds)
  --learn on|off   session learning in the sticky columns (default on, sticky's
                   default); off is a control: nothing of sticky is left on
                   established connections, so those rows should read 1.00
  --json PATH      also write the results as JSON
  --readme PATH    also write the tables between the bench markers of PATH
  --sticky PATH    sticky binary (default: `sticky` next to this executable)
  --worker PATH    worker binary (default: the fair-floor C worker built with
                   this bench; `sticky-demo-worker` is the thread-per-connection one)
  --direct ADDR    debug: start nothing, measure a server already listening
                   at ADDR in every column (checks the harness itself)
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
    modes: Vec<Mode>,
    /// Registered and learned sessions of the memory measurement (None: skip it).
    memory: Option<(usize, usize)>,
    /// Only the memory measurement (`--memory-only`).
    memory_only: bool,
    json: Option<PathBuf>,
    readme: Option<PathBuf>,
    direct: Option<SocketAddr>,
    learn: bool,
    /// Run only the WebSocket learn on/off comparison (`ws_learn`).
    ws_learn: bool,
    /// A cgroup v2 directory to start sticky in.
    cgroup: Option<PathBuf>,
    /// sticky listens on 0.0.0.0 (for the delay line), not 127.0.0.1.
    listen_any: bool,
    /// Run only the foreign-request comparison (`foreign`).
    foreign_bench: bool,
    /// `--foreign-requests` for sticky (None: its default).
    foreign: Option<&'static str>,
}

fn parse_args(args: Vec<String>) -> Result<Opts, String> {
    let exe_dir = crate::host::exe_dir();
    let mut opts = Opts {
        sticky: exe_dir.join("sticky"),
        worker: PathBuf::from(env!("STICKY_FAIR_WORKER")),
        rounds: 3,
        duration: Duration::from_secs(3),
        clients: 64,
        modes: Mode::default_modes(),
        memory: None,
        memory_only: false,
        json: None,
        readme: None,
        direct: None,
        learn: true,
        ws_learn: false,
        cgroup: None,
        listen_any: false,
        foreign_bench: false,
        foreign: None,
    };
    let (mut rounds, mut duration) = (None, None);
    let (mut sessions, mut learned, mut memory) = (None, None, true);
    let mut quick = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => quick = true,
            "--ws-learn" => opts.ws_learn = true,
            "--no-memory" => memory = false,
            "--memory-only" => opts.memory_only = true,
            "--foreign" => opts.foreign_bench = true,
            "--rounds" => rounds = Some(number(&value("--rounds")?)? as usize),
            "--duration" => {
                duration = Some(Duration::from_secs_f64(number(&value("--duration")?)?))
            }
            "--clients" => opts.clients = number(&value("--clients")?)? as usize,
            "--sessions" => sessions = Some(number(&value("--sessions")?)? as usize),
            "--learned" => learned = Some(number(&value("--learned")?)? as usize),
            "--modes" => {
                opts.modes = value("--modes")?
                    .split(',')
                    .map(|k| Mode::parse(k.trim()))
                    .collect::<Result<_, _>>()?
            }
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
    let (default_rounds, default_secs, default_learned) = if quick {
        (1, 1.0, 100_000)
    } else {
        (3, 3.0, 1_000_000)
    };
    opts.rounds = rounds.unwrap_or(default_rounds).max(1);
    opts.duration = duration.unwrap_or(Duration::from_secs_f64(default_secs));
    opts.clients = opts.clients.max(1);
    if opts.modes.is_empty() {
        return Err("--modes needs at least one of sticky, cookie, floor".into());
    }
    opts.memory = (memory && opts.direct.is_none()).then(|| {
        (
            sessions.unwrap_or(1_000_000),
            learned.unwrap_or(default_learned),
        )
    });
    Ok(opts)
}

fn number(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|n| *n > 0.0)
        .ok_or(format!("{s:?} is not a positive number"))
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Sticky,
    /// Sticky with `--rotation-batch` of this many microseconds.
    Batch(u32),
    Cookie,
    Floor,
    /// `--placement bpf-cookie` (Linux 6.9+): by default only where the
    /// kernel has its kfunc (`default_modes`), else sticky would fall back
    /// to rotation under this label.
    BpfCookie,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Sticky, Mode::Cookie, Mode::BpfCookie, Mode::Floor];

    /// What `--modes` defaults to.
    fn default_modes() -> Vec<Mode> {
        let bpf_cookie = crate::host::kernel_has_bpf_cookie();
        Mode::ALL
            .into_iter()
            .filter(|&m| m != Mode::BpfCookie || bpf_cookie)
            .collect()
    }

    fn parse(key: &str) -> Result<Mode, String> {
        if key == "batch" {
            return Ok(Mode::Batch(1000));
        }
        if let Some(window) = key.strip_prefix("batch:") {
            return batch_micros(window).map(Mode::Batch);
        }
        Mode::ALL
            .into_iter()
            .find(|m| m.label() == key)
            .ok_or(format!(
                "unknown mode {key:?} (sticky, batch[:WINDOW], cookie, floor, bpf-cookie)"
            ))
    }
    fn label(self) -> String {
        match self {
            Mode::Sticky => "sticky".into(),
            Mode::Batch(us) if us % 1000 == 0 => format!("batch:{}ms", us / 1000),
            Mode::Batch(us) => format!("batch:{us}us"),
            Mode::Cookie => "cookie".into(),
            Mode::Floor => "floor".into(),
            Mode::BpfCookie => "bpf-cookie".into(),
        }
    }
    /// Value of `sticky run --placement`.
    fn placement(self) -> &'static str {
        match self {
            Mode::Sticky | Mode::Batch(_) => "sticky",
            Mode::Cookie => "cookie",
            Mode::Floor => "syn",
            Mode::BpfCookie => "bpf-cookie",
        }
    }
    /// Extra `sticky run` arguments of the mode.
    fn args(self) -> Vec<String> {
        match self {
            Mode::Batch(us) => vec!["--rotation-batch".into(), format!("{us}us")],
            _ => Vec::new(),
        }
    }
}

/// A window like 250us or 2ms, in microseconds.
fn batch_micros(window: &str) -> Result<u32, String> {
    let bad = || format!("batch:{window}: the window must be like 250us or 2ms");
    let (number, scale) = if let Some(n) = window.strip_suffix("us") {
        (n, 1)
    } else if let Some(n) = window.strip_suffix("ms") {
        (n, 1000)
    } else {
        return Err(bad());
    };
    match number.parse::<u32>() {
        Ok(n) if n > 0 => n.checked_mul(scale).ok_or_else(bad),
        _ => Err(bad()),
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

/// The workloads that share a cluster in a round, each group a fresh one.
/// A single client's workloads run with clients and cluster pinned to one
/// CPU (`Pinning` says why), concurrent new connections unpinned (they are
/// measured for throughput, with every CPU).
#[derive(Clone, Copy, PartialEq)]
enum Group {
    Established,
    Serial,
    Concurrent,
    /// Through the delay line: sticky listens on 0.0.0.0, unpinned.
    Far,
}

impl Group {
    fn kind(self) -> Kind {
        match self {
            Group::Established => Kind::Established,
            Group::Serial | Group::Concurrent | Group::Far => Kind::NewConnection,
        }
    }
}

struct Workload {
    /// Row label in the tables.
    name: String,
    /// Key in the JSON output.
    key: &'static str,
    kind: Kind,
    clients: usize,
    /// New connections: how long a client waits between `connect` and its
    /// first byte (the distance it emulates).
    delay: Duration,
    /// New connections: where each one comes from.
    sources: Sources,
    /// New connections through the delay line with this round trip
    /// (`delay_line`), from the clients' namespace, each from an address of
    /// its own; None: on loopback.
    line_round_trip: Option<Duration>,
}

/// The client addresses of a new-connection workload.
#[derive(Clone, Copy, PartialEq)]
enum Sources {
    /// A fresh address for every connection, as many distinct users have
    /// (`connection_address`).
    PerConnection,
    /// One address per client for all its connections, as a busy NAT or a
    /// proxy in front would have (`client_address`).
    PerClient,
}

impl Workload {
    fn group(&self) -> Group {
        match (self.kind, self.clients) {
            (Kind::Established, _) => Group::Established,
            (Kind::NewConnection, _) if self.line_round_trip.is_some() => Group::Far,
            (Kind::NewConnection, 1) => Group::Serial,
            (Kind::NewConnection, _) => Group::Concurrent,
        }
    }
}

/// Every workload, in table order.
fn workloads(opts: &Opts) -> Vec<Workload> {
    let new = |name: String, key, clients, delay_ms| Workload {
        name,
        key,
        kind: Kind::NewConnection,
        clients,
        delay: Duration::from_millis(delay_ms),
        sources: Sources::PerConnection,
        line_round_trip: None,
    };
    let far = |name: String, key, clients, round_trip_ms| Workload {
        line_round_trip: Some(Duration::from_millis(round_trip_ms)),
        ..new(name, key, clients, 0)
    };
    let established = |name: String, key, clients| Workload {
        name,
        key,
        kind: Kind::Established,
        clients,
        delay: Duration::ZERO,
        sources: Sources::PerClient,
        line_round_trip: None,
    };
    let n = opts.clients;
    vec![
        new("serial".into(), "serial", 1, 0),
        Workload {
            sources: Sources::PerClient,
            ..new("serial, one address".into(), "serial_one_address", 1, 0)
        },
        new(format!("{n} clients"), "concurrent", n, 0),
        new(format!("1 ms away, {n} clients"), "distance_1ms", n, 1),
        new(format!("20 ms away, {n} clients"), "distance_20ms", n, 20),
        // Fewer clients at 1 ms: the line forwards every frame in user
        // space, which at 64 clients would take most of a CPU from the
        // cluster.
        far(
            format!("1 ms round trip, {FAR_CLIENTS} clients"),
            "round_trip_1ms",
            FAR_CLIENTS,
            1,
        ),
        far(
            format!("20 ms round trip, {n} clients"),
            "round_trip_20ms",
            n,
            20,
        ),
        established("established, serial".into(), "established_serial", 1),
        established(
            format!("established, {ESTABLISHED_CLIENTS} clients"),
            "established_concurrent",
            ESTABLISHED_CLIENTS,
        ),
    ]
}

/// One workload in one mode, accumulated over rounds.
#[derive(Default)]
struct Cell {
    stats: Stats,
    /// The supervisor's CPU seconds while the workload ran.
    supervisor_cpu_s: f64,
}

impl Cell {
    /// The supervisor's CPU milliseconds per 1,000 connections.
    fn supervisor_ms_per_1k(&self) -> f64 {
        match self.stats.connections {
            0 => f64::NAN,
            n => self.supervisor_cpu_s * 1e6 / n as f64,
        }
    }
}

/// One workload's results in every mode (`cells[i]` is `Opts::modes[i]`).
struct Measured {
    workload: Workload,
    cells: Vec<Cell>,
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
    /// Whether sticky ran in a cgroup of its own (`cgroup`).
    own_cgroup: bool,
    /// The kernel programs' time per connection, or why it is missing.
    programs: Result<Vec<prog_time::ProgramTime>, String>,
    memory: Option<memory::Memory>,
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
    let cgroup = match opts.direct {
        Some(_) => None,
        None => cgroup::BenchCgroup::create("core")
            .inspect_err(|e| eprintln!("note: sticky runs in this process's cgroup, so its programs also see the clients' packets: {e}"))
            .ok(),
    };
    let opts = &Opts {
        cgroup: cgroup.as_ref().map(|c| c.0.clone()),
        ..opts.clone()
    };
    // The far workloads need root (namespaces) and iproute2; without them,
    // the rest still runs.
    let delay_line = match opts.direct {
        Some(_) => None,
        None => delay_line::DelayLine::start()
            .inspect_err(|e| eprintln!("note: no delay line, so no round-trip workloads: {e}"))
            .ok(),
    };
    let mut results = Results {
        workloads: workloads(opts)
            .into_iter()
            .map(|workload| Measured {
                workload,
                cells: opts.modes.iter().map(|_| Cell::default()).collect(),
            })
            .collect(),
        sticky_learning: (!opts.learn).then_some(false),
        pinning: None,
        others: other_stickies(),
        own_cgroup: cgroup.is_some(),
        programs: Err("not measured".into()),
        memory: None,
    };
    warn_others(&results.others);
    let pinning = match opts.direct {
        Some(_) => None,
        None => Pinning::pick(),
    };
    results.pinning = pinning.as_ref().map(Pinning::describe);
    let mut learning_seen = false;
    let rounds = if opts.memory_only { 0 } else { opts.rounds };
    for round in 1..=rounds {
        for (m, &mode) in opts.modes.iter().enumerate() {
            let mut line = format!("round {round}/{} {:6}:", opts.rounds, mode.label());
            // Each group gets its own cluster (`Group`). Established first:
            // on a fresh cluster, not right after this mode's burst of short
            // connections (worker threads exiting, TIME_WAIT sockets).
            for group in [
                Group::Established,
                Group::Serial,
                Group::Concurrent,
                Group::Far,
            ] {
                let kind = group.kind();
                let pins = match group {
                    Group::Established | Group::Serial => pinning.as_ref(),
                    Group::Concurrent | Group::Far => None,
                };
                let far = match (group, &delay_line) {
                    (Group::Far, None) => continue,
                    (Group::Far, Some(line)) => Some(line),
                    _ => None,
                };
                let cluster_opts = Opts {
                    listen_any: far.is_some(),
                    ..opts.clone()
                };
                let cluster = match opts.direct {
                    Some(_) => None,
                    None => Some(Cluster::start(
                        &cluster_opts,
                        mode,
                        pins.map(Pinning::cpus),
                    )?),
                };
                if let (Some(c), true, true) = (&cluster, mode != Mode::Floor, opts.learn) {
                    let learning = c.learning();
                    if learning == Some(false) {
                        eprintln!(
                            "warning: sticky runs without its session learner:\n{}",
                            c.log_tail()
                        );
                    }
                    results.sticky_learning =
                        match (learning_seen, results.sticky_learning, learning) {
                            (false, _, l) => l,
                            (true, Some(a), Some(b)) => Some(a && b),
                            _ => None,
                        };
                    learning_seen = true;
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
                    if w.group() != group {
                        continue;
                    }
                    let cpu_before = cluster.as_ref().map_or(0.0, Cluster::cpu_seconds);
                    let frames_before = far.map(|l| l.frames());
                    let mut stats = match kind {
                        Kind::NewConnection => run_new_connections(
                            addr,
                            &sessions,
                            w,
                            opts.duration,
                            Placing {
                                cpus: pins.map(Pinning::cpus),
                                line: far,
                            },
                        ),
                        Kind::Established => {
                            run_established(addr, w.clients, opts.duration, pins.map(Pinning::cpus))
                        }
                    };
                    let cpu = cluster.as_ref().map_or(0.0, Cluster::cpu_seconds) - cpu_before;
                    stats.latencies.sort_unstable();
                    line += &format!(
                        " {} {} req p50 {:.1} µs ({} errors{});",
                        w.name,
                        stats.latencies.len(),
                        stats.percentile_us(0.50),
                        stats.errors,
                        match (frames_before, far.map(|l| l.frames())) {
                            (Some((f0, l0)), Some((f1, l1))) =>
                                format!(", delay line: {} frames, {} lost", f1 - f0, l1 - l0),
                            _ => String::new(),
                        }
                    );
                    let cell = &mut measured.cells[m];
                    cell.stats.merge(stats);
                    cell.supervisor_cpu_s += cpu;
                }
                if let Some(cluster) = cluster {
                    cluster.check_alive()?;
                }
            }
            eprintln!("{}", line.trim_end_matches(';'));
        }
    }
    for m in &mut results.workloads {
        for (mode, cell) in opts.modes.iter().zip(&mut m.cells) {
            cell.stats.latencies.sort_unstable();
            if let Some(e) = &cell.stats.first_error {
                eprintln!("first error ({}, {}): {e}", m.workload.name, mode.label());
            }
        }
    }
    if opts.direct.is_none() && !opts.memory_only {
        let workloads: Vec<&Workload> = results.workloads.iter().map(|m| &m.workload).collect();
        results.programs = prog_time::measure(opts, &workloads);
        if let Err(e) = &results.programs {
            eprintln!("note: kernel programs' time not measured: {e}");
        }
    }
    if let Some((registered, learned)) = opts.memory {
        let measured = memory::measure(opts, registered, learned)?;
        if opts.memory_only {
            print!("{}", measured.table());
            return Ok(());
        }
        results.memory = Some(measured);
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
    let report = report::table(opts, &results);
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
        std::fs::write(path, report::json(opts, &results))
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
        Cluster::start_with(opts, mode, cpus, &[])
    }

    /// Like `start`, with `extra` arguments to `sticky run`.
    fn start_with(
        opts: &Opts,
        mode: Mode,
        cpus: Option<&[usize]>,
        extra: &[&str],
    ) -> Result<Cluster, String> {
        let port = crate::host::free_port()?;
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
                &match opts.listen_any {
                    true => format!("0.0.0.0:{port}"),
                    false => addr.to_string(),
                },
                "--workers",
                &WORKERS.to_string(),
            ])
            .args(["--placement", mode.placement()])
            .args(mode.args())
            .args(match (mode, opts.learn) {
                // The control: no cgroup program at all, so the foreign
                // check (which runs in them) is off too unless asked for.
                (Mode::Sticky | Mode::Batch(_) | Mode::Cookie | Mode::BpfCookie, false)
                    if opts.foreign.is_none() =>
                {
                    &["--learn", "off", "--foreign-requests", "off"][..]
                }
                (Mode::Sticky | Mode::Batch(_) | Mode::Cookie | Mode::BpfCookie, false) => {
                    &["--learn", "off"][..]
                }
                _ => &[],
            })
            .args(extra)
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

    /// The supervisor's CPU time so far (user + system, all its threads).
    fn cpu_seconds(&self) -> f64 {
        crate::host::cpu_seconds(self.child.id())
    }

    fn pid(&self) -> u32 {
        self.child.id()
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
    /// "session learning and the foreign-request check are off" before
    /// "listening on" when it could not.
    /// None if the log does not tell (within 2 s).
    fn learning(&self) -> Option<bool> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            {
                let log = self.log.lock().unwrap();
                if log
                    .iter()
                    .any(|l| l.contains("session learning and the foreign-request check are off"))
                {
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

/// `w.clients` threads, each doing one request per new connection in a
/// loop, for `duration`, waiting `w.delay` between connect and the request;
/// a request is timed from connect to its last byte.
fn run_new_connections(
    addr: SocketAddr,
    sessions: &[Session],
    w: &Workload,
    duration: Duration,
    placing: Placing,
) -> Stats {
    let (clients, delay) = (w.clients, w.delay);
    let source = |t: usize, n: usize| match (placing.line, w.sources) {
        (Some(line), _) => line.next_source(),
        (None, Sources::PerConnection) => connection_address(t, clients, n),
        (None, Sources::PerClient) => client_address(t),
    };
    let addr = placing.line.map_or(addr, |l| l.server(addr.port()));
    if let (Some(line), Some(round_trip)) = (placing.line, w.line_round_trip) {
        line.set_round_trip(round_trip);
    }
    run_clients(clients, placing.cpus, |t, barrier| {
        if let Some(Err(e)) = placing.line.map(|l| l.enter_clients()) {
            let mut stats = Stats::default();
            stats.fail(format!("cannot enter the clients' namespace: {e}"));
            barrier.wait();
            return stats;
        }
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
            let from = source(t, stats.connections as usize);
            stats.connections += 1;
            match exchange_after(addr, Some(from), &requests[i], delay) {
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

/// Where a new-connection workload's clients run.
#[derive(Clone, Copy, Default)]
struct Placing<'a> {
    /// Pinned to these CPUs.
    cpus: Option<&'a [usize]>,
    /// Beyond this delay line.
    line: Option<&'a delay_line::DelayLine>,
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

/// Client `t`'s own source address, for all its connections.
///
/// The kernel spreads each connection's port over the ephemeral range
/// (those of one parity first, about 14,000), and the server keeps every
/// connection it closed (it closes first) in TIME_WAIT for 60 s: the k-th
/// connection from one address reuses the 4-tuple of one still in
/// TIME_WAIT with a chance of about k / 14,000 within the first minute. The kernel makes a request socket for such a SYN
/// whatever the placement (it skips the SYN cookie check), which cookie
/// placement pays with the queue path: a busy NAT's cost, not a user's.
fn client_address(t: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 1, (t % 256) as u8, 1 + (t / 256) as u8)
}

/// The source address of client `t`'s `n`-th connection (of `clients`):
/// every connection from an address of its own, as distinct users make
/// them, so that none reuses a 4-tuple the server holds in TIME_WAIT
/// (`client_address`). Loopback is 127.0.0.0/8: 8.3 million addresses in
/// 127.100-227.x.1-254, none of sticky's own (its plugs use 127.83.x.y),
/// reused only after that many connections.
fn connection_address(t: usize, clients: usize, n: usize) -> std::net::Ipv4Addr {
    const PER_OCTET: usize = 256 * 254;
    let j = (n * clients + t) % (128 * PER_OCTET);
    let (high, low) = (j / PER_OCTET, j % PER_OCTET);
    std::net::Ipv4Addr::new(
        127,
        100 + high as u8,
        (low / 254) as u8,
        1 + (low % 254) as u8,
    )
}

fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    exchange_after(
        addr,
        None,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::ZERO,
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
