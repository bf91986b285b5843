//! The core benchmark's tables (Markdown, for the terminal and the README)
//! and JSON, from its `Results`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Cell, Kind, Measured, Mode, Opts, Results, WORKERS};
use crate::host::quote;
use crate::measure::ratio;

/// p50, p99 and rate of `cell` over the floor's cell of the same workload.
fn ratios(opts: &Opts, m: &Measured, cell: &Cell) -> Option<[f64; 3]> {
    let floor = opts.modes.iter().position(|&x| x == Mode::Floor)?;
    let (s, f) = (&cell.stats, &m.cells[floor].stats);
    Some([
        ratio(s.percentile_us(0.50), f.percentile_us(0.50)),
        ratio(s.percentile_us(0.99), f.percentile_us(0.99)),
        ratio(s.rate(), f.rate()),
    ])
}

fn worker_name(opts: &Opts) -> String {
    let name = opts
        .worker
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    match name.as_str() {
        "sticky-fair-worker" => "fair-floor C workers (one thread, epoll)".into(),
        "sticky-demo-worker" => "demo workers (std-only Rust, a thread per connection)".into(),
        other => format!("`{other}` workers"),
    }
}

pub fn table(opts: &Opts, r: &Results) -> String {
    let mut out = String::new();
    let target = match opts.direct {
        Some(addr) => format!("direct to {addr} in every column (harness check)"),
        None => format!(
            "{WORKERS} {}, sticky with {}",
            worker_name(opts),
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
        names.join(", ")
    };
    out += &format!(
        "\n## sticky placement vs SYN-time balancing (floor)\n\n{target}; {} round(s) of {:.1} s per workload and mode, alternating ({}); one paired run on a shared machine.\n\n- sticky: rotation of sorting listeners (default); batch:W: the same with `--rotation-batch W`; cookie: `--placement cookie`; bpf-cookie: `--placement bpf-cookie`; floor: `--placement syn`, no stickiness.\n- {}: one new connection per request, timed from connect to the response's last byte, each connection from a source address of its own (\"N ms away\": the client waits that long between connect and its first byte; \"one address\": every connection from the same address, ports picked by the kernel, as behind a busy NAT).\n- {}: one keep-alive connection per client, opened before the clock starts; requests back to back, each timed from its write to the response's last byte.\n- Serial and established workloads: {} (a single client's round trip is then CPU work only, no cross-CPU wake-up whose cost is a coin flip of the scheduler); concurrent new connections unpinned. {}.\n- supervisor: CPU time (user + system) of `sticky run` itself per 1,000 connections opened.\n\n",
        opts.rounds,
        opts.duration.as_secs_f64(),
        opts.modes.iter().map(|m| m.label()).collect::<Vec<_>>().join(", "),
        names(Kind::NewConnection),
        names(Kind::Established),
        r.pinning.as_deref().unwrap_or("unpinned"),
        if r.own_cgroup {
            "sticky and its workers in a cgroup of their own, as under systemd: its cgroup programs see the server's packets only, not the clients'"
        } else {
            "sticky in the clients' cgroup: its cgroup programs also ran on the clients' packets"
        },
    );
    out += "| workload | mode | requests | rate (req/s) | p50 (µs) | p99 (µs) | max (µs) | errors | wrong worker | supervisor (ms / 1k conns) |\n";
    out += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for m in &r.workloads {
        for (mode, cell) in opts.modes.iter().zip(&m.cells) {
            let s = &cell.stats;
            // Established requests carry no sid: no owner to check.
            let (wrong, cpu) = match m.workload.kind {
                Kind::NewConnection => (
                    s.wrong_worker.to_string(),
                    format!("{:.2}", cell.supervisor_ms_per_1k()),
                ),
                Kind::Established => ("-".into(), "-".into()),
            };
            out += &format!(
                "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {wrong} | {cpu} |\n",
                m.workload.name,
                mode.label(),
                s.latencies.len(),
                s.rate(),
                s.percentile_us(0.50),
                s.percentile_us(0.99),
                s.percentile_us(1.0),
                s.errors,
            );
        }
    }
    if opts.modes.contains(&Mode::Floor) {
        out += "\n| workload | mode | p50 / floor | p99 / floor | rate / floor |\n|---|---|---:|---:|---:|\n";
        for m in &r.workloads {
            for (mode, cell) in opts.modes.iter().zip(&m.cells) {
                if *mode == Mode::Floor {
                    continue;
                }
                let [p50, p99, rate] = ratios(opts, m, cell).unwrap_or([f64::NAN; 3]);
                out += &format!(
                    "| {} | {} | {p50:.3} | {p99:.3} | {rate:.3} |\n",
                    m.workload.name,
                    mode.label()
                );
            }
        }
    }
    out += &programs_table(r);
    if let Some(mem) = &r.memory {
        out += &mem.table();
    }
    out
}

/// The kernel programs' time per connection (`prog_time`), a row per
/// new-connection workload.
fn programs_table(r: &Results) -> String {
    let programs = match &r.programs {
        Ok(p) => p,
        Err(e) => return format!("\nKernel programs' time per connection: not measured ({e}).\n"),
    };
    let mut out = format!(
        "\nKernel programs' CPU time per connection (µs: every BPF program sticky loaded, summed over their runs, then in parentheses {}; one cluster per mode, 1 s per workload, in a pass after the rounds with the kernel's run-time statistics on, which the rounds leave off):\n\n| workload | {} |\n|---|{}\n",
        super::prog_time::KINDS.join(" / "),
        programs.iter().map(|p| p.mode.label()).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(programs.len()),
    );
    for (i, m) in r.workloads.iter().enumerate() {
        if programs.iter().all(|p| p.ns_per_conn[i].is_none()) {
            continue;
        }
        let cells: Vec<String> = programs
            .iter()
            .map(|p| match (p.ns_per_conn[i], p.by_kind[i]) {
                (Some(ns), Some(kinds)) => format!(
                    "{:.2} ({})",
                    ns / 1e3,
                    kinds.map(|k| format!("{:.2}", k / 1e3)).join(" / ")
                ),
                _ => "-".into(),
            })
            .collect();
        out += &format!("| {} | {} |\n", m.workload.name, cells.join(" | "));
    }
    out
}

/// Replaces what sits between the README's bench markers with `report`.
pub fn update_readme(path: &Path, report: &str) -> Result<(), String> {
    replace_between_markers(path, "<!-- bench:begin -->", "<!-- bench:end -->", report)
}

/// Replaces what sits between `begin` and `end` in `path` with a stamp
/// (machine, CPUs) and `report`, its first heading one level down.
pub fn replace_between_markers(
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

/// A number for JSON: null when not finite.
pub fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

/// `{"<mode>": {"<workload key>": {"total": µs, "<kind>": µs, ...}, ...}, ...}`,
/// or null.
fn programs_json(r: &Results) -> String {
    let Ok(programs) = &r.programs else {
        return "null".into();
    };
    let modes: Vec<String> = programs
        .iter()
        .map(|p| {
            let cells: Vec<String> = r
                .workloads
                .iter()
                .zip(p.ns_per_conn.iter().zip(&p.by_kind))
                .filter_map(|(m, (ns, kinds))| {
                    let kinds: Vec<String> = super::prog_time::KINDS
                        .iter()
                        .zip((*kinds)?)
                        .map(|(k, ns)| format!("\"{k}\": {}", num(ns / 1e3)))
                        .collect();
                    Some(format!(
                        "{}: {{\"total\": {}, {}}}",
                        quote(m.workload.key),
                        num((*ns)? / 1e3),
                        kinds.join(", ")
                    ))
                })
                .collect();
            format!("{}: {{{}}}", quote(&p.mode.label()), cells.join(", "))
        })
        .collect();
    format!("{{{}}}", modes.join(", "))
}

/// JSON by hand: a handful of numbers does not justify serde. One key per
/// workload (`Workload::key`), one per mode inside; `conns` counts
/// connections opened, equal to `requests` for the new-connection workloads.
pub fn json(opts: &Opts, r: &Results) -> String {
    let cell_json = |m: &Measured, c: &Cell| {
        let s = &c.stats;
        let (wrong, cpu) = match m.workload.kind {
            Kind::NewConnection => (s.wrong_worker.to_string(), num(c.supervisor_ms_per_1k())),
            Kind::Established => ("null".into(), "null".into()),
        };
        let ratio = match ratios(opts, m, c) {
            Some([p50, p99, rate]) => format!(
                "{{\"p50\": {}, \"p99\": {}, \"rate\": {}}}",
                num(p50),
                num(p99),
                num(rate)
            ),
            None => "null".into(),
        };
        format!(
            "{{\"requests\": {}, \"conns\": {}, \"seconds\": {}, \"rate\": {}, \"p50_us\": {}, \"p99_us\": {}, \"max_us\": {}, \"errors\": {}, \"wrong_worker\": {wrong}, \"supervisor_ms_per_1k_conns\": {cpu}, \"over_floor\": {ratio}}}",
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
            let modes: Vec<String> = opts
                .modes
                .iter()
                .zip(&m.cells)
                .map(|(mode, c)| format!("      \"{}\": {}", mode.label(), cell_json(m, c)))
                .collect();
            format!(
                "  \"{}\": {{\n      \"name\": {},\n      \"kind\": \"{}\",\n      \"clients\": {},\n      \"delay_ms\": {},\n{}\n    }}",
                w.key,
                quote(&w.name),
                match w.kind {
                    Kind::NewConnection => "new_connection",
                    Kind::Established => "established",
                },
                w.clients,
                w.delay.as_millis(),
                modes.join(",\n")
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
        "{{\n  \"unix_time\": {unix_time},\n  \"kernel\": {},\n  \"cpus\": {cpus},\n  \"direct\": {},\n  \"workers\": {WORKERS},\n  \"worker\": {},\n  \"sticky_learning\": {},\n  \"established_pinning\": {},\n  \"other_sticky_pids\": {:?},\n  \"own_cgroup\": {},\n  \"program_us_per_conn\": {},\n  \"rounds\": {},\n  \"seconds_per_round\": {},\n  \"clients\": {},\n  \"memory\": {},\n{}\n}}\n",
        quote(kernel.trim()),
        opts.direct.map_or("null".into(), |a| quote(&a.to_string())),
        quote(&opts.worker.display().to_string()),
        r.sticky_learning.map_or("null".into(), |l| l.to_string()),
        r.pinning.as_deref().map_or("null".into(), quote),
        r.others,
        r.own_cgroup,
        programs_json(r),
        opts.rounds,
        num(opts.duration.as_secs_f64()),
        opts.clients,
        r.memory.as_ref().map_or("null".into(), |m| m.json()),
        workloads.join(",\n")
    )
}
