//! `sticky`: sticky sessions for multi-process servers, placed by the kernel.
//!
//! `sticky run` loads the steering programs, creates the listeners, starts
//! the workers and then stays off the data path: it only rotates the sorting
//! listener, answers the control socket and restarts workers. See
//! ARCHITECTURE.md for the code map.

mod adoption;
mod control;
mod flood;
mod listeners;
mod reject;
mod resets;
mod sessions;
mod sorter;
mod spawn;
mod steering;
mod supervisor;

use std::{
    ffi::OsString,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sticky_common::{
    Balance, Config, Foreign, Mode, MAX_CPUS, MAX_WORKERS, PARAM_MAX, REJECT_SLOT, SESSIONS_MAX,
    SINK_SLOT,
};

/// Logs one line to stderr, prefixed so it stands out among worker output.
#[macro_export]
macro_rules! log {
    // One write(2) per line: workers share this stderr.
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("sticky: {}\n", format_args!($($arg)*));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

#[derive(Parser)]
#[command(
    name = "sticky",
    version,
    about = "Sticky sessions for multi-process servers, placed by the Linux kernel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start N workers behind one address, each connection placed on the worker owning its session.
    Run(RunArgs),
    /// Print the placement counters and sessions of a running `sticky run`.
    Stats {
        /// Control socket of the running sticky (default: the one for --listen's port).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Address the running sticky listens on, to find its control socket.
        #[arg(long, default_value = "0.0.0.0:3000")]
        listen: SocketAddr,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address and port to listen on (IPv4 or IPv6; [::] takes IPv4 too; port 0 picks one).
    #[arg(long, default_value = "0.0.0.0:3000")]
    listen: SocketAddr,
    /// Number of worker processes [default: one per CPU].
    #[arg(long)]
    workers: Option<usize>,
    /// How connections without a known session are spread.
    #[arg(long, value_enum, default_value_t = BalanceArg::LeastConnection)]
    balance: BalanceArg,
    /// Query parameter that carries the session id in the request line.
    #[arg(long, default_value = "sid")]
    sid_param: String,
    /// Period of the sorting listener's rotation while connections arrive (e.g. 1ms, 500us).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    rotate: Duration,
    /// How long workers get to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    grace: Duration,
    /// Path of the control socket [default: $XDG_RUNTIME_DIR or /tmp, sticky-<port>.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// `syn` balances at SYN time with no stickiness: the benchmark floor.
    #[arg(long, value_enum, default_value_t = PlacementArg::Sticky)]
    placement: PlacementArg,
    /// Learn sessions from the workers' own Engine.IO handshake answers, so
    /// workers need no sticky code.
    #[arg(long, value_enum, default_value_t = LearnArg::On)]
    learn: LearnArg,
    /// A request carrying another worker's session on a reused keep-alive
    /// connection: `reset` drops it and resets the connection (the client
    /// resends it on a new one, placed by its sid); `pass` lets the
    /// connection's worker answer it (counted); `off` does not look (the
    /// benchmark's control). Needs session learning on.
    #[arg(long, value_enum, default_value_t = ForeignArg::Reset)]
    foreign_requests: ForeignArg,
    /// Forget a learned session after this long without a request carrying its sid.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    learn_idle: Duration,
    /// Capacity of the session table, registered and learned sessions
    /// together (1..=1048576): bounds the kernel memory it can take.
    #[arg(long, default_value_t = SESSIONS_MAX,
          value_parser = clap::value_parser!(u32).range(1..=SESSIONS_MAX as i64))]
    max_sessions: u32,
    /// The worker command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Clone, Copy, ValueEnum)]
enum BalanceArg {
    Random,
    RoundRobin,
    LeastConnection,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlacementArg {
    Sticky,
    Syn,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ForeignArg {
    Reset,
    Pass,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LearnArg {
    On,
    Off,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Stats { control, listen } => {
            stats(control.unwrap_or_else(|| default_control(listen.port())))
        }
    };
    if let Err(e) = result {
        log!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: RunArgs) -> Result<()> {
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if workers == 0 || workers > MAX_WORKERS as usize {
        bail!("--workers must be between 1 and {MAX_WORKERS}");
    }
    let param = &args.sid_param;
    if param.is_empty()
        || param.len() >= PARAM_MAX
        || !param
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(&c))
    {
        bail!(
            "--sid-param must be 1..{} bytes of [A-Za-z0-9_.-]",
            PARAM_MAX - 1
        );
    }
    let mut command = spawn::WorkerCommand::resolve(&args.command)?;

    let mut steering = steering::Steering::load(args.max_sessions)?;
    let mut maps = steering.take_maps()?;
    let cpus = sorting_cpus();
    // Workers left running by a supervisor that died are taken over.
    let orphans = adoption::find_orphans(args.listen, workers)?;
    let mut old_steering = if orphans.is_empty() {
        None
    } else {
        let pids: Vec<u32> = orphans.iter().map(|o| o.pid).collect();
        Some(adoption::OldSteering::find(args.listen.port(), &pids)?)
    };
    let mut adopted = Vec::new();
    let group = if orphans.is_empty() {
        listeners::ListenerGroup::bind(args.listen, workers)?
    } else {
        let mut taken: Vec<Option<std::os::fd::OwnedFd>> = (0..workers).map(|_| None).collect();
        for o in orphans {
            taken[o.index] = Some(o.listener);
            adopted.push(supervisor::Adopted {
                index: o.index,
                pid: o.pid,
                pidfd: o.pidfd,
            });
        }
        listeners::ListenerGroup::with_adopted(args.listen, taken)?
    };
    let balance = match args.balance {
        BalanceArg::Random => Balance::Random,
        BalanceArg::RoundRobin => Balance::RoundRobin,
        BalanceArg::LeastConnection => Balance::LeastConnection,
    };
    let mode = match args.placement {
        PlacementArg::Sticky => Mode::Sticky,
        PlacementArg::Syn => Mode::SynBalance,
    };
    // Learning needs placements (sticky mode) and the learner attached.
    let learning =
        args.learn == LearnArg::On && mode == Mode::Sticky && attach_learner(&mut steering);
    let mut config = Config::new(workers as u32, cpus as u32, balance, mode, param);
    if learning {
        config = config.learning(group.addr.port());
        config.foreign = match args.foreign_requests {
            ForeignArg::Reset if can_reset() => Foreign::Reset,
            ForeignArg::Reset | ForeignArg::Pass => Foreign::Pass,
            ForeignArg::Off => Foreign::Off,
        } as u32;
    }
    // The port names this group's selector, for a successor's adoption.
    config.port = u32::from(group.addr.port());
    maps.config.set(0, config, 0)?;
    let mut table = sessions::SessionTable::new(
        maps.sessions,
        maps.workers,
        maps.learned,
        workers,
        args.max_sessions as usize,
    );
    // Adopted workers are live and keep their sessions before the new
    // selector replaces the old one: no connection sees them down.
    for a in &adopted {
        table.worker_started(a.index, a.pid)?;
    }
    if let Some(old) = old_steering.as_mut() {
        let indices: Vec<usize> = adopted.iter().map(|a| a.index).collect();
        let carried = old.sessions(&indices);
        let (registered, learned) = (carried.registered.len(), carried.learned.len());
        table.carry_over(carried)?;
        for a in &adopted {
            old.release_slot(a.index)?;
            log!(
                "adopted worker {} (pid {}) and its listener from an earlier sticky",
                a.index,
                a.pid
            );
        }
        log!("kept {registered} registered and {learned} learned sessions of the adopted workers");
    }
    for (i, fd) in group.workers.iter().enumerate() {
        maps.listeners
            .set(i as u32, fd, 0)
            .context("placing a worker listener in its slot")?;
    }
    maps.listeners
        .set(REJECT_SLOT, &group.reject, 0)
        .context("placing the 503 listener in its slot")?;
    maps.listeners
        .set(SINK_SLOT, &group.sink, 0)
        .context("placing the sink in its slot")?;
    steering.attach_selector(&group.workers[0])?;
    // The old selector is detached now; dropping our handles frees its maps.
    drop(old_steering);
    let slots: sorter::SockArray = Arc::new(Mutex::new(maps.listeners));

    let counters = Arc::new(maps.counters);
    let resetting = config.foreign == Foreign::Reset as u32;
    let foreign_mode = match config.foreign {
        f if f == Foreign::Reset as u32 => "reset",
        f if f == Foreign::Off as u32 => "off",
        _ => "pass",
    };
    let reset_stats = Arc::new(resets::ResetStats::new(foreign_mode));
    // The integrations keep polling connections alive when foreign requests
    // are reset (README, "Requests on reused connections").
    command.set_env("STICKY_FOREIGN_REQUESTS", foreign_mode);
    if resetting {
        resets::serve(maps.resets, group.addr.port(), reset_stats.clone())
            .context("starting the connection resetter")?;
    }
    let sessions = Arc::new(Mutex::new(table));
    let control_path = args
        .control
        .unwrap_or_else(|| default_control(group.addr.port()));
    let control = control::ControlSocket::bind(&control_path)?;
    let _remove_control = control.serve(control::ControlState {
        sessions: sessions.clone(),
        counters: counters.clone(),
        resets: reset_stats,
    });
    reject::serve(group.reject);
    if learning {
        expire_learned_sessions(sessions.clone(), args.learn_idle);
    }
    // Shared by the sorters (wake-ups) and the supervisor (restarts).
    let worker_listeners: sorter::WorkerListeners = Arc::new(Mutex::new(group.workers));
    let mut sorter = match mode {
        Mode::Sticky => Some(sorter::start(
            slots.clone(),
            worker_listeners.clone(),
            group.addr,
            steering.sort_program()?,
            cpus,
            args.rotate,
            counters.clone(),
            maps.handoff,
            maps.doorbells,
        )?),
        Mode::SynBalance => None,
    };
    if let Some(s) = sorter.as_mut() {
        s.guard_floods(maps.config, config, counters)?;
    }

    let supervisor = supervisor::Supervisor::start(
        command,
        supervisor::Listeners {
            addr: group.addr,
            slots,
            workers: worker_listeners,
        },
        control_path.clone(),
        sessions,
        args.grace,
        adopted,
    )?;
    log!(
        "listening on {} with {workers} workers ({}), control socket {}",
        group.addr,
        match (mode, balance) {
            (Mode::SynBalance, _) => "placement: syn, no stickiness",
            (_, Balance::Random) => "balance: random",
            (_, Balance::RoundRobin) => "balance: round-robin",
            (_, Balance::LeastConnection) => "balance: least-connection",
        },
        control_path.display()
    );
    let result = supervisor.run();
    if let Some(s) = sorter.as_mut() {
        s.stop();
    }
    log!("stopped");
    result
}

/// Attaches the session learner to our own cgroup; on failure, says why and
/// goes on without learning (registration over the control socket works).
fn attach_learner(steering: &mut steering::Steering) -> bool {
    let attached = steering::own_cgroup().and_then(|cgroup| steering.attach_learner(&cgroup));
    match attached {
        Ok(()) => true,
        Err(e) => {
            log!("session learning is off: {e:#}");
            false
        }
    }
}

/// Can the kernel reset connections for us? If not, says so in one line.
fn can_reset() -> bool {
    match resets::probe() {
        Ok(()) => true,
        Err(why) => {
            log!(
                "{why}: a request carrying another worker's session on a reused connection \
                 reaches the connection's worker (see README, \"Requests on reused connections\")"
            );
            false
        }
    }
}

/// Forgets idle learned sessions, on a background thread, forever.
fn expire_learned_sessions(sessions: Arc<Mutex<sessions::SessionTable>>, idle: Duration) {
    let every = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    std::thread::Builder::new()
        .name("learned-expiry".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            sessions.lock().unwrap().expire_learned(idle);
        })
        .expect("spawning the learned-session expiry thread");
}

/// CPUs that may process packets: one sorting loop each.
fn sorting_cpus() -> usize {
    // SAFETY: plain sysconf query.
    let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    (configured.max(1) as usize).min(MAX_CPUS as usize)
}

fn default_control(port: u16) -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    dir.join(format!("sticky-{port}.sock"))
}

fn stats(path: PathBuf) -> Result<()> {
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach a running sticky at {} (pass --control or --listen)",
            path.display()
        )
    })?;
    stream.write_all(b"stats\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let Some(body) = line.trim_end().strip_prefix("ok ") else {
        bail!("sticky answered: {}", line.trim_end())
    };
    for field in body.split(' ') {
        println!("{}", field.replacen('=', " ", 1));
    }
    Ok(())
}

/// "1ms", "500us", "2s", "1.5s", "100ns".
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 1ms, 500us or 2s"))?;
    let secs = match unit {
        "ns" => value / 1e9,
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" | "" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit in `{s}` (use ns, us, ms, s or m)")),
    };
    if secs <= 0.0 || !secs.is_finite() {
        return Err(format!("`{s}` must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}
