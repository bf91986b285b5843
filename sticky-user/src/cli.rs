//! The command line: what `sticky` accepts, and `Settings`, the validated
//! form of `sticky run`'s arguments that the rest of the program reads.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sticky_common::{Balance, Config, Foreign, Mode, MAX_WORKERS, PARAM_MAX, SESSIONS_MAX};

use crate::{identity::RunAs, log, spawn::WorkerCommand};

#[derive(Parser)]
#[command(
    name = "sticky",
    version,
    about = "Sticky sessions for multi-process servers, placed by the Linux kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Start N workers behind one address, each connection placed on the worker owning its session.
    Run(Box<RunArgs>),
    /// Print the placement counters and sessions of a running `sticky run`.
    Stats {
        /// Control socket of the running sticky (default: the one for --listen's port).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Address the running sticky listens on, to find its control socket.
        #[arg(long, default_value = "0.0.0.0:3000")]
        listen: SocketAddr,
    },
    /// Start a new generation of workers (new code on disk) while the old one drains its sessions.
    Reload {
        /// Control socket of the running sticky (default: the one for --listen's port).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Address the running sticky listens on, to find its control socket.
        #[arg(long, default_value = "0.0.0.0:3000")]
        listen: SocketAddr,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Address and port to listen on (IPv4 or IPv6; [::] takes IPv4 too; port 0 picks one).
    #[arg(long, default_value = "0.0.0.0:3000")]
    pub listen: SocketAddr,
    /// Number of worker processes [default: one per CPU].
    #[arg(long)]
    pub workers: Option<usize>,
    /// How connections without a known session are spread.
    #[arg(long, value_enum, default_value_t = BalanceArg::LeastConnection)]
    pub balance: BalanceArg,
    /// Query parameter that carries the session id in the request line.
    #[arg(long, default_value = "sid")]
    pub sid_param: String,
    /// Period of the sorting listener's rotation while connections arrive (e.g. 1ms, 500us).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    pub rotate: Duration,
    /// Rotate per batch (default placement): while connections overlap on
    /// a CPU, rotate at most once per WINDOW (e.g. 1ms, at most 100ms), so
    /// that one rotation places them all; a connection arriving alone still
    /// rotates at once. Queued connections wait up to WINDOW. Default: a
    /// rotation at every SYN.
    #[arg(long, value_name = "WINDOW", value_parser = parse_batch_window)]
    pub rotation_batch: Option<Duration>,
    /// How long workers get to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// After `sticky reload`, how long the old workers may keep serving
    /// their sessions before they are stopped (sooner once they have none).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Path of the control socket [default: $XDG_RUNTIME_DIR or /tmp, sticky-<port>.sock].
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// `cookie` answers every SYN with a SYN cookie and places the first
    /// data segment by sid in the kernel, with no rotation; `syn` balances
    /// at SYN time with no stickiness: the benchmark floor; `bpf-cookie`
    /// answers SYNs with sticky's own cookies from a tc program, keeping
    /// every TCP option (Linux 6.9+; else the default placement).
    #[arg(long, value_enum, default_value_t = PlacementArg::Sticky)]
    pub placement: PlacementArg,
    /// `--placement bpf-cookie`: how long a cookie key is current; the
    /// previous one is still accepted, so a cookie lives one to two periods.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub cookie_key_period: Duration,
    /// Learn sessions from the workers' own Engine.IO handshake answers, so
    /// workers need no sticky code.
    #[arg(long, value_enum, default_value_t = LearnArg::On)]
    pub learn: LearnArg,
    /// A request carrying another worker's session on a reused keep-alive
    /// connection: `reset` drops it and resets the connection (the client
    /// resends it on a new one, placed by its sid); `pass` lets the
    /// connection's worker answer it (counted); `off` does not look (the
    /// benchmark's control). Needs session learning on.
    #[arg(long, value_enum, default_value_t = ForeignArg::Reset)]
    pub foreign_requests: ForeignArg,
    /// Forget a learned session after this long without a request carrying its sid.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub learn_idle: Duration,
    /// Capacity of the session table, registered and learned sessions
    /// together (1..=1048576): bounds the kernel memory it can take.
    #[arg(long, default_value_t = SESSIONS_MAX,
          value_parser = clap::value_parser!(u32).range(1..=SESSIONS_MAX as i64))]
    pub max_sessions: u32,
    /// Give each worker a Node.js IPC channel to the relay (fd 4,
    /// NODE_CHANNEL_FD), for `@socket.io/cluster-adapter`; `auto`: when the
    /// command is `node`.
    #[arg(long, value_enum, default_value_t = IpcArg::Auto)]
    pub ipc: IpcArg,
    /// Run every worker as this user (name or uid): its groups as
    /// initgroups sets them, no capabilities, no_new_privs.
    #[arg(long)]
    pub user: Option<String>,
    /// The workers' group (name or gid) [default: the user's primary group].
    #[arg(long, requires = "user")]
    pub group: Option<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (port 0 picks one).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// The worker command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BalanceArg {
    Random,
    RoundRobin,
    LeastConnection,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PlacementArg {
    Sticky,
    Cookie,
    Syn,
    BpfCookie,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IpcArg {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ForeignArg {
    Reset,
    Pass,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LearnArg {
    On,
    Off,
}

/// `sticky run`'s arguments, checked and resolved.
pub struct Settings {
    pub listen: SocketAddr,
    pub workers: usize,
    pub balance: Balance,
    pub mode: Mode,
    /// `--placement bpf-cookie` asked for; `main::attach_cookies` says
    /// whether this kernel has it.
    pub bpf_cookie: bool,
    pub cookie_key_period: Duration,
    pub sid_param: String,
    pub rotate: Duration,
    pub rotation_batch: Option<Duration>,
    pub grace: Duration,
    pub drain: Duration,
    pub control: Option<PathBuf>,
    /// Asked for; whether it runs also depends on the kernel (`main::attach_learner`).
    pub learn: bool,
    pub learn_idle: Duration,
    /// Asked for; `main::foreign_requests` says what the kernel can do.
    pub foreign_requests: Foreign,
    pub max_sessions: u32,
    /// `--user`/`--group`, resolved (also given to `command`).
    pub run_as: Option<RunAs>,
    pub metrics: Option<SocketAddr>,
    pub command: WorkerCommand,
    /// Workers get a Node IPC channel to the relay (`--ipc`).
    pub node_ipc: bool,
}

impl Settings {
    pub fn from_args(args: RunArgs) -> Result<Settings> {
        let workers = args
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if workers == 0 || workers > MAX_WORKERS as usize {
            bail!("--workers must be between 1 and {MAX_WORKERS}");
        }
        check_sid_param(&args.sid_param)?;
        if args.cookie_key_period < Duration::from_secs(1) {
            bail!("--cookie-key-period must be at least 1s (a cookie lives one to two periods)");
        }
        let run_as = match &args.user {
            Some(user) => Some(RunAs::resolve(user, args.group.as_deref())?),
            None => None,
        };
        if let Some(who) = &run_as {
            crate::privileges::check_can_become(who.uid)?;
        }
        let mode = match args.placement {
            PlacementArg::Sticky => Mode::Sticky,
            PlacementArg::Cookie if syncookies_enabled() => Mode::Cookie,
            PlacementArg::Cookie => {
                log!("--placement cookie: net.ipv4.tcp_syncookies is 0, so the kernel sends no SYN cookies; placing by rotation (--placement sticky) instead (sysctl -w net.ipv4.tcp_syncookies=1 to place by cookie)");
                Mode::Sticky
            }
            PlacementArg::Syn => Mode::SynBalance,
            // The selector as by default: SYNs the tc program leaves to the
            // stack (TIME_WAIT reuses) take the sorting path (reqsk.rs).
            PlacementArg::BpfCookie => Mode::Sticky,
        };
        if args.rotation_batch.is_some() && mode != Mode::Sticky {
            log!("--rotation-batch: this placement rotates no listener per connection; ignored (it applies to --placement sticky)");
        }
        let command = WorkerCommand::resolve(&args.command)?;
        Ok(Settings {
            listen: args.listen,
            workers,
            balance: match args.balance {
                BalanceArg::Random => Balance::Random,
                BalanceArg::RoundRobin => Balance::RoundRobin,
                BalanceArg::LeastConnection => Balance::LeastConnection,
            },
            mode,
            bpf_cookie: matches!(args.placement, PlacementArg::BpfCookie),
            cookie_key_period: args.cookie_key_period,
            sid_param: args.sid_param,
            rotate: args.rotate,
            rotation_batch: args.rotation_batch,
            grace: args.grace,
            drain: args.drain,
            control: args.control,
            // Learning needs placements by sticky: not the floor.
            learn: args.learn == LearnArg::On && mode != Mode::SynBalance,
            learn_idle: args.learn_idle,
            foreign_requests: match args.foreign_requests {
                ForeignArg::Reset => Foreign::Reset,
                ForeignArg::Pass => Foreign::Pass,
                ForeignArg::Off => Foreign::Off,
            },
            max_sessions: args.max_sessions,
            node_ipc: match args.ipc {
                IpcArg::Auto => command.is_node(),
                IpcArg::On => true,
                IpcArg::Off => false,
            },
            command: command.run_as(run_as.clone()),
            run_as,
            metrics: args.metrics,
        })
    }

    /// Whether the cgroup programs are wanted: for learning sessions, and
    /// for the foreign-request check, which needs each connection's worker
    /// also when the workers register their sessions (`--learn off`). Not
    /// for the floor (`--placement syn`), which places nothing by sid.
    pub fn watches_connections(&self) -> bool {
        self.mode != Mode::SynBalance && (self.learn || self.foreign_requests != Foreign::Off)
    }

    /// The selector's configuration for a group on `port`.
    pub fn kernel_config(
        &self,
        cpus: usize,
        port: u16,
        learning: bool,
        foreign: Foreign,
    ) -> Config {
        let mut config = Config::new(
            // Room for a reload's second generation (`supervisor::slot_of`).
            crate::supervisor::slot_count(self.workers) as u32,
            cpus as u32,
            self.balance,
            self.mode,
            &self.sid_param,
        );
        if learning {
            config = config.learning(port);
        }
        config.foreign = foreign as u32;
        // The port names this group's selector, for a successor's adoption.
        config.port = u32::from(port);
        config
    }

    /// The line that says sticky serves (tests and tools wait for it).
    pub fn ready_line(&self, addr: SocketAddr, control: &std::path::Path) -> String {
        format!(
            "listening on {addr} with {} workers ({}), control socket {}",
            self.workers,
            self.describe_placement(),
            control.display()
        )
    }

    /// How placement works, for the start-up line.
    pub fn describe_placement(&self) -> &'static str {
        if self.bpf_cookie {
            return match self.balance {
                Balance::Random => "placement: bpf-cookie, balance: random",
                Balance::RoundRobin => "placement: bpf-cookie, balance: round-robin",
                Balance::LeastConnection => "placement: bpf-cookie, balance: least-connection",
            };
        }
        match (self.mode, self.balance) {
            (Mode::SynBalance, _) => "placement: syn, no stickiness",
            (Mode::Cookie, Balance::Random) => "placement: cookie, balance: random",
            (Mode::Cookie, Balance::RoundRobin) => "placement: cookie, balance: round-robin",
            (Mode::Cookie, Balance::LeastConnection) => {
                "placement: cookie, balance: least-connection"
            }
            (_, Balance::Random) => "balance: random",
            (_, Balance::RoundRobin) => "balance: round-robin",
            (_, Balance::LeastConnection) => "balance: least-connection",
        }
    }
}

/// Whether this network namespace's kernel answers with SYN cookies when a
/// listener's queue is full (`net.ipv4.tcp_syncookies` 1 or 2; it also
/// governs IPv6), which `--placement cookie` relies on for every SYN.
fn syncookies_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syncookies").is_ok_and(|v| v.trim() != "0")
}

fn check_sid_param(param: &str) -> Result<()> {
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
    Ok(())
}

pub fn default_control(port: u16) -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    dir.join(format!("sticky-{port}.sock"))
}

/// Longest `--rotation-batch`: queued connections wait up to it.
const BATCH_WINDOW_MAX: Duration = Duration::from_millis(100);

fn parse_batch_window(s: &str) -> Result<Duration, String> {
    let window = parse_duration(s)?;
    if window > BATCH_WINDOW_MAX {
        return Err(format!(
            "`{s}` is longer than 100ms: queued connections would wait that long (try 1ms)"
        ));
    }
    Ok(window)
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
