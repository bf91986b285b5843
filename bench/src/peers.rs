//! `sticky-bench [peers]`: sticky against the systems users would pick
//! instead, on the same Socket.IO worker code (`bench/peers/server.js`;
//! the Rust socketioxide worker for the last variant), with 2 and 4
//! workers, every workload of `workloads.rs` against every variant of
//! `servers.rs`, in one run.
//!
//! Each round starts every (workers, variant) server fresh, warms each
//! workload up, then measures it for a fixed time, sampling the front's
//! CPU time before and after. Rounds alternate the order of the variants
//! (forward, backward, ...) so that drift of a shared machine spreads over
//! all of them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::host::{self, interrupted, other_stickies, warn_others};
use crate::results::{key, Opts, Results};
use crate::servers::{self, Programs, Server, Variant};
use crate::workloads::Workload;

const USAGE: &str =
    "usage: sticky-bench [peers] [--quick] [--rounds N] [--duration SECS] [--warmup SECS]
                    [--clients N] [--workers N,N] [--variants KEY,...]
                    [--workloads KEY,...] [--json PATH]
                    [--readme PATH] [--plot PATH] [--sticky PATH] [--rust-worker PATH]
                    [--peers DIR] [--nginx PATH]

  --quick          1 round, 0.7 s per workload after 0.2 s of warm-up
                   (default: 4 rounds, 1.25 s after 0.3 s)
  --rounds N       rounds; each starts every server fresh
  --duration SECS  measured time of each workload, per round
  --warmup SECS    unmeasured run of each workload before it
  --clients N      concurrent clients (default 64)
  --workers N,N    worker counts (default 2,4)
  --variants K,..  any of sticky, sticky_cookie (--placement cookie),
                   sticky_bpf_cookie (--placement bpf-cookie, Linux 6.9+),
                   socketio_sticky, nginx, floor, sticky_rust (default: these
                   seven, sticky_bpf_cookie only where the kernel has its
                   kfunc), sticky_syn (diagnostic: sticky's listeners
                   balanced at SYN time, no stickiness)
  --workloads K,.. any of new_connection_serial, new_connection_concurrent,
                   long_polling_keepalive, session_establishment,
                   websocket_round_trip (default: all)
  --json PATH      write the results as JSON
  --readme PATH    write the tables between the peers markers of PATH
  --plot PATH      write the latency CDFs and rates as SVG
  --sticky PATH    sticky binary (default: `sticky` next to this executable)
  --rust-worker PATH  socketioxide worker (default: `sticky-socketioxide-worker`
                   next to this executable)
  --peers DIR      bench/peers, with server.js and node_modules (npm ci)
  --nginx PATH     nginx binary (default: on PATH or /usr/sbin; else Debian's
                   package is fetched with apt-get download)";

pub fn main(args: Vec<String>) {
    let result = parse_args(args).and_then(|mut opts| run(&mut opts));
    if let Err(e) = result {
        eprintln!("sticky-bench: {e}");
        std::process::exit(1);
    }
}

fn parse_args(args: Vec<String>) -> Result<Opts, String> {
    let exe_dir = host::exe_dir();
    let mut opts = Opts {
        rounds: 4,
        duration: Duration::from_millis(1250),
        warmup: Duration::from_millis(300),
        clients: 64,
        workers: vec![2, 4],
        variants: default_variants(),
        workloads: Workload::ALL.to_vec(),
        json: None,
        readme: None,
        plot: None,
        programs: Programs {
            sticky: exe_dir.join("sticky"),
            rust_worker: exe_dir.join("sticky-socketioxide-worker"),
            // target/release/ -> the workspace's bench/peers
            peers: exe_dir.join("../../bench/peers"),
            nginx: None,
        },
        nginx: None,
    };
    let (mut rounds, mut duration, mut warmup) = (None, None, None);
    let mut quick = false;
    let seconds = |s: String| -> Result<Duration, String> {
        s.parse::<f64>()
            .ok()
            .filter(|x| *x >= 0.0 && x.is_finite())
            .map(Duration::from_secs_f64)
            .ok_or(format!("{s:?} is not a number of seconds"))
    };
    let count = |s: &str| -> Result<usize, String> {
        s.parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(format!("{s:?} is not a positive integer"))
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => quick = true,
            "--rounds" => rounds = Some(count(&value("--rounds")?)?),
            "--duration" => duration = Some(seconds(value("--duration")?)?),
            "--warmup" => warmup = Some(seconds(value("--warmup")?)?),
            "--clients" => opts.clients = count(&value("--clients")?)?,
            "--workers" => {
                opts.workers = value("--workers")?
                    .split(',')
                    .map(count)
                    .collect::<Result<_, _>>()?
            }
            "--variants" => {
                opts.variants = value("--variants")?
                    .split(',')
                    .map(|k| Variant::parse(k).ok_or(format!("unknown variant {k:?}\n{USAGE}")))
                    .collect::<Result<_, _>>()?
            }
            "--workloads" => {
                opts.workloads = value("--workloads")?
                    .split(',')
                    .map(|k| Workload::parse(k).ok_or(format!("unknown workload {k:?}\n{USAGE}")))
                    .collect::<Result<_, _>>()?
            }
            "--json" => opts.json = Some(value("--json")?.into()),
            "--readme" => opts.readme = Some(value("--readme")?.into()),
            "--plot" => opts.plot = Some(value("--plot")?.into()),
            "--sticky" => opts.programs.sticky = value("--sticky")?.into(),
            "--rust-worker" => opts.programs.rust_worker = value("--rust-worker")?.into(),
            "--peers" => opts.programs.peers = value("--peers")?.into(),
            "--nginx" => opts.nginx = Some(value("--nginx")?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let (r, d, w) = if quick { (1, 0.7, 0.2) } else { (4, 1.25, 0.3) };
    opts.rounds = rounds.unwrap_or(r);
    opts.duration = duration.unwrap_or(Duration::from_secs_f64(d));
    opts.warmup = warmup.unwrap_or(Duration::from_secs_f64(w));
    Ok(opts)
}

/// `Variant::DEFAULT`, without bpf-cookie on a kernel that lacks its kfunc.
fn default_variants() -> Vec<Variant> {
    let bpf_cookie = crate::host::kernel_has_bpf_cookie();
    Variant::DEFAULT
        .into_iter()
        .filter(|&v| v != Variant::StickyBpfCookie || bpf_cookie)
        .collect()
}

fn check_programs(opts: &mut Opts) -> Result<(), String> {
    let p = &mut opts.programs;
    let uses = |v: Variant| opts.variants.contains(&v);
    let uses_sticky = [
        Variant::Sticky,
        Variant::StickyRust,
        Variant::StickySyn,
        Variant::StickyCookie,
        Variant::StickyBpfCookie,
    ]
    .into_iter()
    .any(uses);
    if uses_sticky && !p.sticky.is_file() {
        return Err(format!(
            "sticky binary {} not found (cargo xtask build, or --sticky PATH)",
            p.sticky.display()
        ));
    }
    if uses(Variant::StickyRust) && !p.rust_worker.is_file() {
        return Err(format!(
            "Rust worker {} not found (cargo xtask build, or --rust-worker PATH)",
            p.rust_worker.display()
        ));
    }
    if let Ok(dir) = p.peers.canonicalize() {
        p.peers = dir;
    }
    if !p.peers.join("node_modules/@socket.io/sticky").is_dir() {
        return Err(format!(
            "{} has no node_modules: run `npm ci` there (cargo xtask bench does)",
            p.peers.display()
        ));
    }
    if uses(Variant::Nginx) {
        p.nginx = Some(match &opts.nginx {
            Some(path) => path.clone(),
            None => servers::find_or_fetch_nginx(&p.peers.join("../../target/nginx"))?,
        });
    }
    Ok(())
}

fn run(opts: &mut Opts) -> Result<(), String> {
    check_programs(opts)?;
    host::catch_signals();
    let started = Instant::now();
    let mut results = Results {
        cells: BTreeMap::new(),
        failures: Vec::new(),
        others: other_stickies(),
        seconds_total: 0.0,
    };
    warn_others(&results.others);
    for round in 1..=opts.rounds {
        let mut order = opts.variants.clone();
        if round % 2 == 0 {
            order.reverse();
        }
        for &workers in &opts.workers {
            for &variant in &order {
                if interrupted() {
                    return Err("interrupted; every server was stopped".into());
                }
                measure(opts, &mut results, round, variant, workers);
            }
        }
    }
    if interrupted() {
        return Err("interrupted; every server was stopped".into());
    }
    for cell in results.cells.values_mut() {
        cell.stats.latencies.sort_unstable();
        cell.stats.right_latencies.sort_unstable();
    }
    results.seconds_total = started.elapsed().as_secs_f64();
    let report = crate::report::markdown(opts, &results, opts.plot.as_deref());
    print!("{report}");
    for f in &results.failures {
        eprintln!("failure: {f}");
    }
    if let Some(path) = &opts.plot {
        crate::plot::draw(path, opts, &results)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &opts.json {
        write(path, &crate::report::json(opts, &results))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &opts.readme {
        crate::report::update_readme(path, &report)?;
        eprintln!("updated {}", path.display());
    }
    Ok(())
}

pub fn write(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Starts one server, runs every workload against it, stops it.
fn measure(opts: &Opts, results: &mut Results, round: usize, variant: Variant, workers: usize) {
    let what = format!(
        "round {round}/{}, {} x{workers}",
        opts.rounds,
        variant.label()
    );
    let mut server = match Server::start(variant, workers, &opts.programs) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{what}: cannot start: {e}");
            results.failures.push(format!("{what}: {e}"));
            return;
        }
    };
    let mut line = format!("{what}:");
    for &workload in &opts.workloads {
        let clients = workload.clients(opts.clients);
        if !opts.warmup.is_zero() {
            workload.run(server.addr, clients, opts.warmup);
        }
        let cpu_before = server.front_cpu();
        let mut stats = workload.run(server.addr, clients, opts.duration);
        let cpu = server.front_cpu() - cpu_before;
        stats.latencies.sort_unstable();
        line += &format!(
            " {} {:.0}/s p50 {:.0}µs{}{};",
            workload.key(),
            stats.rate(),
            stats.percentile_us(0.5),
            match stats.wrong_worker {
                0 => String::new(),
                n => format!(" wrong {n}"),
            },
            match stats.errors {
                0 => String::new(),
                n => format!(" errors {n}"),
            },
        );
        if let Some(e) = &stats.first_error {
            eprintln!("{what}, {}: first error: {e}", workload.key());
        }
        let cell = results
            .cells
            .entry(key(variant, workers, workload))
            .or_default();
        cell.stats.merge(stats);
        cell.front_cpu_s += cpu;
        if let Err(e) = server.check_alive() {
            eprintln!("{what}: {e}");
            results.failures.push(format!("{what}: {e}"));
            break;
        }
        if interrupted() {
            break;
        }
    }
    eprintln!("{}", line.trim_end_matches(';'));
}
