//! `sticky`: sticky sessions for multi-process servers, placed by the kernel.
//!
//! `sticky run` loads the steering programs, creates the listeners, starts
//! the workers and then stays off the data path: it only rotates the sorting
//! listener, answers the control socket and restarts workers. See
//! ARCHITECTURE.md for the code map.

mod adoption;
mod batch;
mod caps;
mod cli;
mod control;
mod expiry;
mod flood;
mod identity;
mod listeners;
mod metrics;
mod plug;
mod privileges;
mod reject;
mod relay;
mod reqsk;
mod resets;
mod sessions;
mod side;
mod sorter;
mod spawn;
mod stats;
mod steering;
mod supervisor;
mod takeover;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, ReusePortSockArray};
use clap::Parser;
use sticky_common::{Foreign, Mode, SidHasher, MAX_CPUS, REJECT_SLOT, SINK_SLOT};

use cli::{Cli, Command, RunArgs, Settings};

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

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Stats { control, listen } => {
            stats(control.unwrap_or_else(|| cli::default_control(listen.port())))
        }
        Command::Reload { control, listen } => {
            reload(control.unwrap_or_else(|| cli::default_control(listen.port())))
        }
    };
    if let Err(e) = result {
        log!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `sticky run`, top-down: configuration, steering, listeners, the sorting
/// listeners made; then the privilege drop (nothing after it needs more
/// than `privileges::SERVING`), the sorters, the side services, the
/// supervisor. Only the sorters and the supervisor keep working after
/// start-up; nothing here is on the data path.
fn run(args: RunArgs) -> Result<()> {
    let mut settings = Settings::from_args(args)?;
    let cpus = sorting_cpus();
    let mut steering = steering::Steering::load(settings.max_sessions, cpus)?;
    let mut maps = steering.take_maps()?;

    // Workers left running by a supervisor that died are taken over.
    let mut takeover = takeover::Takeover::find(settings.listen, settings.workers)?;
    let group = takeover.listener_group(settings.listen)?;

    let Kernel {
        config,
        learning,
        foreign,
        sid_key,
    } = configure_kernel(&settings, &mut steering, &takeover, cpus, group.addr.port())?;
    maps.config.set(0, config, 0)?;
    let mut table = sessions::SessionTable::new(
        maps.sessions,
        maps.workers,
        SidHasher { key: sid_key },
        settings.workers,
        settings.max_sessions as usize,
    );
    takeover.carry_sessions(&mut table)?;
    fill_slots(&mut maps.listeners, &group)?;
    steering.attach_selector(&group.workers[0])?;
    let (cookies, cookie_counters) = reqsk::attach_if_asked(&mut settings, group.addr).unzip();
    let adopted = takeover.finish();
    if let Some(who) = &settings.run_as {
        for a in &adopted {
            identity::note_adopted(a.index, a.pid, who);
        }
    }

    let slots: sorter::SockArray = Arc::new(Mutex::new(maps.listeners));
    let counters = Arc::new(maps.counters);
    let reset_stats = Arc::new(resets::ResetStats::new(foreign.name()));
    // Workers may want to know what happens to a request on a reused
    // connection (README, "Requests on reused connections").
    settings
        .command
        .set_env("STICKY_FOREIGN_REQUESTS", foreign.name());
    let sessions = Arc::new(Mutex::new(table));
    let side = side::SideServices::bind(&settings, group.addr.port(), &sessions)?;
    let (control_path, relay) = (side.control_path.clone(), side.relay.clone());
    let events = supervisor::events();

    // Shared by the sorters (wake-ups) and the supervisor (restarts).
    let worker_listeners: sorter::WorkerListeners = Arc::new(Mutex::new(group.workers));
    let sorting = match settings.mode {
        Mode::Sticky | Mode::Cookie => Some(sorter::prepare(sorter::Sorting {
            slots: slots.clone(),
            workers: worker_listeners.clone(),
            addr: group.addr,
            filter: steering.sort_program()?,
            cpus,
            period: settings.rotate,
            // Cookie mode sends no SYN to a sorting listener.
            rotate_on_clock: settings.mode == Mode::Sticky,
            // Cookie mode rotates only when a listener is readable.
            batch: settings
                .rotation_batch
                .filter(|_| settings.mode == Mode::Sticky),
            counters: counters.clone(),
            handoff: maps.handoff,
            doorbells: maps.doorbells,
        })?),
        Mode::SynBalance => None,
    };

    // Start-up is over.
    let serving = privileges::Serving {
        port: group.addr.port(),
        with_user: settings.run_as.is_some(),
    };
    let mut sorter =
        drop_privileges_then_sort(sorting, &serving, || maps.config.get(&0, 0).is_ok())?;
    // Threads only from here on: capabilities are per thread, and the drop
    // above is checked to have run while this was the only one.
    if foreign == Foreign::Reset {
        resets::serve(maps.resets, group.addr.port(), reset_stats.clone())
            .context("starting the connection resetter")?;
    }
    if let Some(cookies) = cookies {
        reqsk::rotate_keys(cookies, settings.cookie_key_period)?;
    }
    let _served = side.serve(control::ControlState {
        cookies: cookie_counters.map(Arc::new),
        sessions: sessions.clone(),
        counters: counters.clone(),
        relay: Some(relay.clone()),
        resets: reset_stats,
        reload: events.0.clone(),
    })?;
    reject::serve(group.reject);
    if learning {
        expiry::spawn(sessions.clone(), counters.clone(), settings.learn_idle);
    }
    if let Some(s) = sorter.as_mut() {
        s.guard_floods(maps.config, config, counters.clone())?;
    }

    let ready = settings.ready_line(group.addr, &control_path);
    let supervisor = supervisor::Supervisor::start(
        supervisor::WorkerSettings {
            command: settings.command.with_relay(relay, settings.node_ipc),
            control: control_path.clone(),
            workers: settings.workers,
            grace: settings.grace,
            drain: settings.drain,
        },
        supervisor::Listeners {
            addr: group.addr,
            slots,
            workers: worker_listeners,
        },
        sessions,
        adopted,
        events,
    )?;
    log!("{ready}");
    let result = supervisor.run();
    if let Some(s) = sorter.as_mut() {
        s.stop();
    }
    log!("stopped");
    result
}

/// What the kernel programs do on this run, as `configure_kernel` found it.
struct Kernel {
    config: sticky_common::Config,
    learning: bool,
    foreign: Foreign,
    /// The sessions map's SipHash-2-4 key: a killed supervisor's, or fresh.
    sid_key: [u64; 2],
}

/// Attaches the cgroup programs if they are wanted and can be, and builds
/// the selector's configuration for a group on `port` from what is in
/// effect.
fn configure_kernel(
    settings: &Settings,
    steering: &mut steering::Steering,
    takeover: &takeover::Takeover,
    cpus: usize,
    port: u16,
) -> Result<Kernel> {
    let watching = settings.watches_connections() && attach_watchers(steering);
    let learning = settings.learn && watching;
    let foreign = foreign_requests(settings, watching);
    let sid_key = takeover
        .sid_key()
        .map_or_else(sessions::fresh_sid_key, Ok)?;
    let config = settings
        .kernel_config(cpus, port, learning, foreign)
        .with_sid_key(sid_key);
    Ok(Kernel {
        config,
        learning,
        foreign,
        sid_key,
    })
}

/// Keeps only the capabilities serving needs (`privileges`), before any
/// thread exists: capabilities are per thread and new threads inherit
/// them. Then starts the sorting threads, which inherit the real-time
/// policy the main thread holds meanwhile (it needs CAP_SYS_NICE to take).
fn drop_privileges_then_sort(
    sorting: Option<sorter::Prepared>,
    serving: &privileges::Serving,
    maps_work: impl Fn() -> bool,
) -> Result<Option<sorter::SortingHandle>> {
    let realtime = privileges::InheritedRealtime::begin();
    let kept = privileges::drop_for_serving(serving, maps_work);
    let sorter = kept.and_then(|kept| {
        log!("{}", privileges::describe(&kept));
        sorting.map(sorter::Prepared::start).transpose()
    });
    realtime.end();
    sorter
}

/// Puts every listener the selector may pick in its slot: the workers',
/// the 503 listener and the sink (the sorting slots are the sorters').
fn fill_slots(
    slots: &mut ReusePortSockArray<MapData>,
    group: &listeners::ListenerGroup,
) -> Result<()> {
    for (i, fd) in group.workers.iter().enumerate() {
        slots
            .set(i as u32, fd, 0)
            .context("placing a worker listener in its slot")?;
    }
    slots
        .set(REJECT_SLOT, &group.reject, 0)
        .context("placing the 503 listener in its slot")?;
    slots
        .set(SINK_SLOT, &group.sink, 0)
        .context("placing the sink in its slot")?;
    Ok(())
}

/// Attaches the cgroup programs (session learning, the foreign-request
/// check) to our own cgroup; on failure, says why and goes on without them
/// (registration over the control socket works).
fn attach_watchers(steering: &mut steering::Steering) -> bool {
    let attached = steering::own_cgroup().and_then(|cgroup| steering.attach_learner(&cgroup));
    match attached {
        Ok(()) => true,
        Err(e) => {
            log!("session learning and the foreign-request check are off: {e:#}");
            false
        }
    }
}

/// What `sticky_watch` does with a foreign request: it needs the cgroup
/// programs and, to reset, a kernel that destroys sockets.
fn foreign_requests(settings: &Settings, watching: bool) -> Foreign {
    match settings.foreign_requests {
        _ if !watching => Foreign::Pass,
        Foreign::Reset if !can_reset() => Foreign::Pass,
        asked => asked,
    }
}

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

/// CPUs that may process packets: one sorting loop each.
fn sorting_cpus() -> usize {
    // SAFETY: plain sysconf query.
    let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    (configured.max(1) as usize).min(MAX_CPUS as usize)
}

fn stats(path: PathBuf) -> Result<()> {
    let body = ask(&path, "stats")?;
    for field in body.split(' ') {
        println!("{}", field.replacen('=', " ", 1));
    }
    Ok(())
}

/// `sticky reload`: prints what the running sticky started.
fn reload(path: PathBuf) -> Result<()> {
    println!("{}", ask(&path, "reload")?);
    Ok(())
}

/// One request line to a running sticky's control socket; its `ok` answer.
fn ask(path: &Path, request: &str) -> Result<String> {
    let mut stream = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach a running sticky at {} (pass --control or --listen)",
            path.display()
        )
    })?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    match line.trim_end().strip_prefix("ok") {
        Some(body) => Ok(body.trim_start().to_owned()),
        None => bail!("sticky answered: {}", line.trim_end()),
    }
}
