//! `sticky-bench core --foreign`: what the foreign-request check costs
//! (README, "Requests on reused connections").
//!
//! The check runs in `sticky_watch` on every request line and in
//! `sticky_learn` on a connection's first answers: one socket-storage
//! lookup per segment, a parse and a `sessions` lookup per request line.
//! `--foreign-requests off` leaves all of it out (the programs of before
//! the check), so each comparison is two clusters side by side, `reset`
//! and `off`, each in a cgroup of its own, one client alternating between
//! them (as in `ws_learn`: the rest of the machine's load cancels out of
//! the ratio), everything on one CPU (`super::Pinning`):
//!
//! - `websocket`: acknowledged Socket.IO echoes over an established
//!   WebSocket (plain socketioxide workers);
//! - `keep-alive polling`: a long-polling-shaped request (`GET` with the
//!   session's sid) on a kept-alive connection (demo workers);
//! - `close per poll`: the same request on a new connection each time, as
//!   with the integrations' `Connection: close`, on both clusters: what
//!   keeping polling connections alive saves;
//! - `resend`: on the `reset` cluster, a kept-alive connection of worker
//!   0's session carries a request of worker 1's: time from its write to
//!   the reset, and to its answer when resent on a new connection (what a
//!   browser pays once per foreign request).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::cgroup::BenchCgroup;
use super::ws_learn::run_paired;
use super::{get, worker, Cluster, Mode, Opts, Pinning, Stats};
use crate::http::Conn;

/// Rows of the table, in order.
const ROWS: [&str; 7] = [
    "websocket, check on (reset)",
    "websocket, check off",
    "keep-alive polling, check on (reset)",
    "keep-alive polling, check off",
    "close per poll, check on",
    "close per poll, check off",
    "resend: request written to its answer on a new connection",
];
const RESET_ONLY: &str = "resend: request written to the reset";

pub fn run(opts: &Opts) -> Result<(), String> {
    let ws_worker = opts
        .worker
        .with_file_name("sticky-plain-socketioxide-worker");
    if !ws_worker.is_file() {
        return Err(format!(
            "{} not found (build with `cargo xtask build`)",
            ws_worker.display()
        ));
    }
    let cgroups = [BenchCgroup::create("reset"), BenchCgroup::create("off")];
    if let Some(Err(e)) = cgroups.iter().find(|c| c.is_err()) {
        eprintln!("note: sticky runs in this process's cgroup: {e}");
    }
    let pinning = Pinning::pick();
    let cpus = pinning.as_ref().map(Pinning::cpus);
    let mut rows: Vec<Stats> = ROWS.iter().map(|_| Stats::default()).collect();
    let mut reset_only = Stats::default();
    for round in 1..=opts.rounds {
        let start = |worker: &std::path::Path| -> Result<Vec<Cluster>, String> {
            ["reset", "off"]
                .into_iter()
                .zip(&cgroups)
                .map(|(foreign, cgroup)| {
                    let o = Opts {
                        worker: worker.to_owned(),
                        learn: true,
                        foreign: Some(foreign),
                        cgroup: cgroup.as_ref().ok().map(|c| c.0.clone()),
                        ..opts.clone()
                    };
                    Cluster::start(&o, Mode::Sticky, cpus)
                })
                .collect()
        };
        let ws = start(&ws_worker)?;
        let [on, off] = run_paired([ws[0].addr, ws[1].addr], 1, opts.duration, cpus);
        rows[0].merge(on);
        rows[1].merge(off);
        for c in ws {
            c.check_alive()?;
        }
        let polling = start(&opts.worker)?;
        let sids = [owned_sids(polling[0].addr)?, owned_sids(polling[1].addr)?];
        let [on, off, close_on, close_off] = run_polling(
            [polling[0].addr, polling[1].addr],
            [&sids[0][0], &sids[1][0]],
            opts.duration,
            cpus,
        );
        rows[2].merge(on);
        rows[3].merge(off);
        rows[4].merge(close_on);
        rows[5].merge(close_off);
        let (to_reset, to_answer) = run_resends(polling[0].addr, &sids[0], opts.duration, cpus);
        reset_only.merge(to_reset);
        rows[6].merge(to_answer);
        for c in polling {
            c.check_alive()?;
        }
        eprintln!("round {round}/{} done", opts.rounds);
    }
    for s in rows.iter_mut().chain([&mut reset_only]) {
        s.latencies.sort_unstable();
        if let Some(e) = &s.first_error {
            eprintln!("first error: {e}");
        }
    }
    let report = table(opts, &rows, &reset_only, pinning.as_ref());
    print!("{report}");
    if let Some(path) = &opts.readme {
        super::report::replace_between_markers(
            path,
            "<!-- bench-foreign:begin -->",
            "<!-- bench-foreign:end -->",
            &report,
        )?;
        eprintln!("updated {}", path.display());
    }
    if let Some(path) = &opts.json {
        let path = path.with_file_name(format!(
            "{}-foreign.json",
            path.file_stem().and_then(|s| s.to_str()).unwrap_or("bench")
        ));
        std::fs::write(&path, json(opts, &rows, &reset_only))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// One registered sid per worker of the cluster at `addr`: `[w0, w1]`.
fn owned_sids(addr: SocketAddr) -> Result<[String; 2], String> {
    let mut found: [Option<String>; 2] = [None, None];
    for n in 0..200 {
        if found.iter().all(Option::is_some) {
            break;
        }
        let sid = format!("benchforeign{n:04}xyz");
        let r = get(addr, &format!("/register?sid={sid}")).map_err(|e| format!("register: {e}"))?;
        match worker(&r).as_deref() {
            Some("0") => found[0].get_or_insert(sid),
            Some("1") => found[1].get_or_insert(sid),
            _ => return Err(format!("/register answered {}", r.status)),
        };
    }
    match found {
        [Some(a), Some(b)] => Ok([a, b]),
        _ => Err("could not register a session on each worker".into()),
    }
}

fn poll_request(sid: &str, close: bool) -> Vec<u8> {
    crate::http::request(
        "GET",
        &format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
        b"",
        close,
    )
}

/// One client: on each cluster (`reset`, `off`), a kept-alive request and
/// one on a new connection with `Connection: close`; the clusters take
/// turns at going first, so that each sees the other's wake of new
/// connections equally.
fn run_polling(
    addrs: [SocketAddr; 2],
    sids: [&str; 2],
    duration: Duration,
    cpus: Option<&[usize]>,
) -> [Stats; 4] {
    on_one_client(cpus, || {
        let mut stats: [Stats; 4] = Default::default();
        let keep = [poll_request(sids[0], false), poll_request(sids[1], false)];
        let close = [poll_request(sids[0], true), poll_request(sids[1], true)];
        let mut conns = addrs.map(|a| Conn::new(a, None));
        for (i, c) in conns.iter_mut().enumerate() {
            stats[i].connections = 1;
            if let Err(e) = c.request(&keep[i]) {
                stats[i].fail(format!("first request: {e}"));
            }
        }
        let start = Instant::now();
        let mut turn = 0;
        while start.elapsed() < duration {
            turn += 1;
            for i in [turn % 2, (turn + 1) % 2] {
                let begin = Instant::now();
                match conns[i].request(&keep[i]) {
                    Ok(r) if r.status == 200 => stats[i]
                        .latencies
                        .push((r.complete - begin).as_nanos() as u64),
                    Ok(r) => stats[i].fail(format!("status {}", r.status)),
                    Err(e) => stats[i].fail(e.to_string()),
                }
            }
            for i in [turn % 2, (turn + 1) % 2] {
                let row = &mut stats[2 + i];
                let begin = Instant::now();
                row.connections += 1;
                match crate::http::exchange(addrs[i], None, &close[i]) {
                    Ok(r) if r.status == 200 => {
                        row.latencies.push((r.complete - begin).as_nanos() as u64)
                    }
                    Ok(r) => row.fail(format!("status {}", r.status)),
                    Err(e) => row.fail(e.to_string()),
                }
            }
        }
        for s in &mut stats {
            s.elapsed = start.elapsed();
        }
        stats
    })
}

/// A kept-alive connection of sids[0]'s worker carries a request of
/// sids[1]'s: (write to reset, write to the answer on a new connection).
fn run_resends(
    addr: SocketAddr,
    sids: &[String; 2],
    duration: Duration,
    cpus: Option<&[usize]>,
) -> (Stats, Stats) {
    let [reset, answer] = on_one_client(cpus, || {
        let mut stats: [Stats; 2] = Default::default();
        let own = poll_request(&sids[0], false);
        let foreign = poll_request(&sids[1], false);
        let start = Instant::now();
        while start.elapsed() < duration {
            let mut conn = Conn::new(addr, None);
            stats[0].connections += 1;
            if let Err(e) = conn.request(&own) {
                stats[0].fail(format!("own request: {e}"));
                continue;
            }
            let begin = Instant::now();
            match conn.request(&foreign) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    stats[0].latencies.push(begin.elapsed().as_nanos() as u64)
                }
                Err(e) => {
                    stats[0].fail(format!("foreign request: {e}, not a reset"));
                    continue;
                }
                Ok(r) => {
                    stats[0].fail(format!("foreign request answered {}, not reset", r.status));
                    continue;
                }
            }
            let mut fresh = Conn::new(addr, None);
            stats[1].connections += 1;
            match fresh.request(&foreign) {
                Ok(r) if r.status == 200 && worker(&r).as_deref() == Some("1") => stats[1]
                    .latencies
                    .push((r.complete - begin).as_nanos() as u64),
                Ok(r) => stats[1].fail(format!("resend answered {} by {:?}", r.status, worker(&r))),
                Err(e) => stats[1].fail(format!("resend: {e}")),
            }
        }
        for s in &mut stats {
            s.elapsed = start.elapsed();
        }
        stats
    });
    (reset, answer)
}

/// Runs `f` on a thread of its own, pinned to `cpus` if given (an error
/// if pinning fails, like `super::run_clients`).
fn on_one_client<const N: usize>(
    cpus: Option<&[usize]>,
    f: impl FnOnce() -> [Stats; N] + Send,
) -> [Stats; N] {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if let Some(cpus) = cpus {
                    if let Err(e) = crate::measure::pin(cpus) {
                        let mut failed: [Stats; N] = std::array::from_fn(|_| Stats::default());
                        failed[0].fail(format!("cannot pin the client to CPUs {cpus:?}: {e}"));
                        return failed;
                    }
                }
                f()
            })
            .join()
            .unwrap()
    })
}

fn table(opts: &Opts, rows: &[Stats], reset_only: &Stats, pinning: Option<&Pinning>) -> String {
    let mut out = format!(
        "\n#### Foreign requests: the check's cost, and a resend's\n\n\
         Two clusters side by side (`--foreign-requests reset`, `--foreign-requests off`: the \
         programs without the check), {} workers each, each in a cgroup of its own; {} round(s) of \
         {:.1} s per workload; one client alternating between the clusters; {}.\n\n\
         | workload | requests | p50 (µs) | p99 (µs) | errors |\n|---|---:|---:|---:|---:|\n",
        super::WORKERS,
        opts.rounds,
        opts.duration.as_secs_f64(),
        pinning.map_or("unpinned".into(), Pinning::describe),
    );
    let line = |name: &str, s: &Stats| {
        format!(
            "| {name} | {} | {:.1} | {:.1} | {} |\n",
            s.latencies.len(),
            s.percentile_us(0.50),
            s.percentile_us(0.99),
            s.errors
        )
    };
    for (name, s) in ROWS.iter().zip(rows) {
        out += &line(name, s);
    }
    out += &line(RESET_ONLY, reset_only);
    let r = |a: &Stats, b: &Stats, q| crate::measure::ratio(a.percentile_us(q), b.percentile_us(q));
    out += &format!(
        "\n| ratio | p50 | p99 |\n|---|---:|---:|\n\
         | websocket, check on / off | {:.3} | {:.3} |\n\
         | keep-alive polling, check on / off | {:.3} | {:.3} |\n\
         | close per poll, check on / off | {:.3} | {:.3} |\n\
         | close per poll / keep-alive polling (both check on) | {:.3} | {:.3} |\n\
         | resend (to the answer) / close per poll (check on) | {:.3} | {:.3} |\n",
        r(&rows[0], &rows[1], 0.50),
        r(&rows[0], &rows[1], 0.99),
        r(&rows[2], &rows[3], 0.50),
        r(&rows[2], &rows[3], 0.99),
        r(&rows[4], &rows[5], 0.50),
        r(&rows[4], &rows[5], 0.99),
        r(&rows[4], &rows[2], 0.50),
        r(&rows[4], &rows[2], 0.99),
        r(&rows[6], &rows[4], 0.50),
        r(&rows[6], &rows[4], 0.99),
    );
    out
}

fn json(opts: &Opts, rows: &[Stats], reset_only: &Stats) -> String {
    let num = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "null".into()
        }
    };
    let entries: Vec<String> = ROWS
        .iter()
        .zip(rows)
        .chain([(&RESET_ONLY, reset_only)])
        .map(|(name, s)| {
            format!(
                "    {{\"workload\": {}, \"requests\": {}, \"p50_us\": {}, \"p99_us\": {}, \"errors\": {}}}",
                crate::host::quote(name),
                s.latencies.len(),
                num(s.percentile_us(0.50)),
                num(s.percentile_us(0.99)),
                s.errors
            )
        })
        .collect();
    format!(
        "{{\n  \"benchmark\": \"foreign-request check, reset vs off; resend cost\",\n  \"rounds\": {},\n  \"seconds_per_round\": {},\n  \"workloads\": [\n{}\n  ]\n}}\n",
        opts.rounds,
        num(opts.duration.as_secs_f64()),
        entries.join(",\n")
    )
}
