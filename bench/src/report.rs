//! The peers benchmark's report: markdown tables (for the terminal and the
//! README), the targets from the same run, and JSON.

use std::path::Path;

use serde_json::{json, Value};

use crate::measure::{percentile_us, ratio};
use crate::results::{Cell, Opts, Results};
use crate::servers::Variant;
use crate::workloads::Workload;

fn fmt(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "-".into()
    }
}

fn p50(c: Option<&Cell>) -> f64 {
    c.map_or(f64::NAN, |c| c.stats.percentile_us(0.5))
}

/// p50 of the right worker's answers only.
fn p50_right(c: Option<&Cell>) -> f64 {
    c.map_or(f64::NAN, |c| percentile_us(&c.stats.right_latencies, 0.5))
}

fn rate(c: Option<&Cell>) -> f64 {
    c.map_or(f64::NAN, |c| c.stats.rate())
}

pub fn markdown(opts: &Opts, r: &Results, plot: Option<&Path>) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = format!(
        "\nMeasured by `cargo xtask bench` on {cpus} CPUs, Linux {}, Node.js {}: {} round(s), each workload warmed up {:.2} s then measured {:.2} s per round, servers started fresh each round; {:.0} s in all. Ratios within one run are what to compare (absolute times drift on shared machines).\n\n",
        kernel.trim(),
        node_version(),
        opts.rounds,
        opts.warmup.as_secs_f64(),
        opts.duration.as_secs_f64(),
        r.seconds_total,
    );
    if let Some(plot) = plot {
        let name = plot
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        out += &format!("![latency CDFs and rates](bench/results/{name})\n\n");
    }
    out += &targets(opts, r);
    out += &front_summary(opts, r);
    for &workload in &opts.workloads {
        let clients = workload.clients(opts.clients);
        let basis = if workload.per_connection() {
            "conns"
        } else {
            workload.unit()
        };
        out += &format!(
            "\n#### {} ({} per second)\n\n| variant | workers | rate (/s) | p50 (µs) | p99 (µs) | errors | wrong worker | front CPU (ms / 1k {basis}) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
            workload.label(clients),
            workload.unit()
        );
        for &workers in &opts.workers {
            for &v in &opts.variants {
                let Some(c) = r.get(v, workers, workload) else {
                    out += &format!("| {} | {workers} | failed to run | | | | | |\n", v.label());
                    continue;
                };
                let s = &c.stats;
                out += &format!(
                    "| {} | {workers} | {} | {} | {} | {} | {} | {} |\n",
                    v.label(),
                    fmt(s.rate(), 0),
                    fmt(s.percentile_us(0.5), 0),
                    fmt(s.percentile_us(0.99), 0),
                    s.errors,
                    s.wrong_worker,
                    front_cpu(c, workload).map_or("-".into(), |x| fmt(x, 1)),
                );
            }
        }
    }
    out += "\nFront CPU: user + system time of the sticky supervisor, the `@socket.io/sticky` (or plain cluster) master, or every nginx process, while the workload ran: per 1,000 TCP connections the clients opened where each operation opens its own, per 1,000 operations on kept connections. Kernel work done in softirq (sticky's placement) is charged to whichever process was running and is not in it.\n";
    if !r.failures.is_empty() {
        out += "\nFailures during the run:\n\n";
        for f in &r.failures {
            out += &format!("- {}\n", f.lines().next().unwrap_or_default());
        }
    }
    out
}

fn front_cpu(c: &Cell, w: Workload) -> Option<f64> {
    if w.per_connection() {
        c.front_ms_per_1k_connections()
    } else {
        c.front_ms_per_1k_ops()
    }
}

fn node_version() -> String {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The targets, as ratios from this run, one row per check.
fn targets(opts: &Opts, r: &Results) -> String {
    let mut out =
        String::from("| target | workers | measured | goal | met |\n|---|---:|---:|---:|:-:|\n");
    let mut row = |what: &str, workers: usize, measured: f64, goal: &str, met: Option<bool>| {
        out += &format!(
            "| {what} | {workers} | {} | {goal} | {} |\n",
            fmt(measured, 2),
            match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            }
        );
    };
    let cmp = |x: f64, ok: bool| x.is_finite().then_some(ok);
    for &w in &opts.workers {
        let get = |v, wl| r.get(v, w, wl);
        let stickies = [
            Variant::Sticky,
            Variant::StickyRust,
            Variant::StickyCookie,
            Variant::StickyBpfCookie,
        ];
        let wrong: u64 = stickies
            .iter()
            .flat_map(|&v| Workload::ALL.iter().filter_map(move |&wl| get(v, wl)))
            .map(|c| c.stats.wrong_worker)
            .sum();
        row(
            "sticky wrong-worker answers, every workload",
            w,
            wrong as f64,
            "0",
            Some(wrong == 0),
        );
        for wl in [Workload::NewConnSerial, Workload::NewConnConcurrent] {
            let tag = if wl == Workload::NewConnSerial {
                "serial"
            } else {
                "64 clients"
            };
            let x = ratio(
                p50(get(Variant::Sticky, wl)),
                p50(get(Variant::SocketIoSticky, wl)),
            );
            row(
                &format!("p50 sticky / @socket.io/sticky, new connection, {tag}"),
                w,
                x,
                "≤ 0.5",
                cmp(x, x <= 0.5),
            );
            let x = ratio(p50(get(Variant::Sticky, wl)), p50(get(Variant::Floor, wl)));
            row(
                &format!("p50 sticky / floor, new connection, {tag}"),
                w,
                x,
                "≤ 1.15",
                cmp(x, x <= 1.15),
            );
            let x = ratio(
                p50(get(Variant::Sticky, wl)),
                p50_right(get(Variant::Floor, wl)),
            );
            row(
                &format!("p50 sticky / floor's right-worker answers, new connection, {tag}"),
                w,
                x,
                "(≤ 1.15)",
                None,
            );
        }
        let x = ratio(
            rate(get(Variant::Sticky, Workload::NewConnConcurrent)),
            rate(get(Variant::Floor, Workload::NewConnConcurrent)),
        );
        row(
            "rate sticky / floor, new connection, 64 clients",
            w,
            x,
            "≥ 0.9",
            cmp(x, x >= 0.9),
        );
        for v in [Variant::StickyCookie, Variant::StickyBpfCookie] {
            if get(v, Workload::NewConnSerial).is_none() {
                continue;
            }
            let x = ratio(
                p50(get(v, Workload::NewConnSerial)),
                p50(get(Variant::SocketIoSticky, Workload::NewConnSerial)),
            );
            row(
                &format!(
                    "p50 {} / @socket.io/sticky, new connection, serial",
                    v.label()
                ),
                w,
                x,
                "≤ 0.5",
                cmp(x, x <= 0.5),
            );
            let x = ratio(
                rate(get(v, Workload::NewConnConcurrent)),
                rate(get(Variant::Floor, Workload::NewConnConcurrent)),
            );
            row(
                &format!("rate {} / floor, new connection, 64 clients", v.label()),
                w,
                x,
                "≥ 0.9",
                cmp(x, x >= 0.9),
            );
        }
        let ws = Workload::WsRoundTrip;
        let x = ratio(p50(get(Variant::Sticky, ws)), p50(get(Variant::Floor, ws)));
        row(
            "WebSocket round trip p50 sticky / floor",
            w,
            x,
            "≈ 1 (≤ 1.05)",
            cmp(x, x <= 1.05),
        );
        let x = ratio(p50(get(Variant::Sticky, ws)), p50(get(Variant::Nginx, ws)));
        row(
            "WebSocket round trip p50 sticky / nginx",
            w,
            x,
            "< 1",
            cmp(x, x < 1.0),
        );
        for wl in [Workload::NewConnConcurrent, Workload::Establish] {
            let x = ratio(
                rate(get(Variant::StickyRust, wl)),
                rate(get(Variant::SocketIoSticky, wl)),
            );
            row(
                &format!(
                    "rate sticky+Rust / @socket.io/sticky, {}",
                    wl.label(opts.clients)
                ),
                w,
                x,
                "≥ 5",
                cmp(x, x >= 5.0),
            );
        }
    }
    out
}

/// The fronts' CPU per 1,000 connections, on the new-connection load.
fn front_summary(opts: &Opts, r: &Results) -> String {
    let fronts = [
        (Variant::Sticky, "sticky supervisor"),
        (Variant::SocketIoSticky, "`@socket.io/sticky` master"),
        (Variant::Nginx, "nginx (all processes)"),
    ];
    let mut out = String::from("\nFront CPU time per 1,000 connections (ms), sid requests on new connections from 64 clients:\n\n| workers |");
    for (_, name) in fronts {
        out += &format!(" {name} |");
    }
    out += "\n|---:|---:|---:|---:|\n";
    for &w in &opts.workers {
        out += &format!("| {w} |");
        for (v, _) in fronts {
            let x = r
                .get(v, w, Workload::NewConnConcurrent)
                .and_then(|c| c.front_ms_per_1k_connections());
            out += &format!(" {} |", x.map_or("-".into(), |x| fmt(x, 1)));
        }
        out += "\n";
    }
    out
}

/// Replaces what sits between the README's peers markers with `report`.
pub fn update_readme(path: &Path, report: &str) -> Result<(), String> {
    const BEGIN: &str = "<!-- peers:begin -->";
    const END: &str = "<!-- peers:end -->";
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
        return Err(format!("{} has no {BEGIN} / {END} markers", path.display()));
    };
    let new = format!(
        "{}{BEGIN}\n{}\n{}",
        &text[..a],
        report.trim_end(),
        &text[b..]
    );
    std::fs::write(path, new).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub fn json(opts: &Opts, r: &Results) -> String {
    let num = |x: f64| {
        if x.is_finite() {
            json!((x * 1000.0).round() / 1000.0)
        } else {
            Value::Null
        }
    };
    let mut variants = serde_json::Map::new();
    for &v in &opts.variants {
        let mut by_workers = serde_json::Map::new();
        for &w in &opts.workers {
            let mut workloads = serde_json::Map::new();
            for &wl in &opts.workloads {
                let Some(c) = r.get(v, w, wl) else { continue };
                let s = &c.stats;
                workloads.insert(
                    wl.key().into(),
                    json!({
                        "label": wl.label(wl.clients(opts.clients)),
                        "unit": wl.unit(),
                        "clients": wl.clients(opts.clients),
                        "count": s.latencies.len(),
                        "seconds": num(s.elapsed.as_secs_f64()),
                        "rate": num(s.rate()),
                        "p50_us": num(s.percentile_us(0.5)),
                        "p50_right_worker_us": num(percentile_us(&s.right_latencies, 0.5)),
                        "p90_us": num(s.percentile_us(0.9)),
                        "p99_us": num(s.percentile_us(0.99)),
                        "max_us": num(s.percentile_us(1.0)),
                        "errors": s.errors,
                        "first_error": s.first_error,
                        "wrong_worker": s.wrong_worker,
                        "connections": s.connections,
                        "front_cpu_s": num(c.front_cpu_s),
                        "front_cpu_ms_per_1k_connections": c.front_ms_per_1k_connections().map(num),
                        "front_cpu_ms_per_1k_operations": c.front_ms_per_1k_ops().map(num),
                    }),
                );
            }
            by_workers.insert(w.to_string(), Value::Object(workloads));
        }
        variants.insert(
            v.key().into(),
            json!({ "label": v.label(), "front": v.front(), "workers": by_workers }),
        );
    }
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let doc = json!({
        "unix_time": unix_time,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "node": node_version(),
        "rounds": opts.rounds,
        "warmup_s": opts.warmup.as_secs_f64(),
        "duration_s": opts.duration.as_secs_f64(),
        "clients": opts.clients,
        "seconds_total": num(r.seconds_total),
        "other_sticky_pids": r.others,
        "failures": r.failures,
        "variants": variants,
    });
    serde_json::to_string_pretty(&doc).expect("serializable") + "\n"
}
