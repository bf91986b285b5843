//! `cargo xtask deploy [--sessions N] [--workers N] [--seconds N] [--drain-s N]`:
//! what a deploy costs the clients, `sticky reload` against restarting the
//! workers (today's way), in one run, side by side.
//!
//! Both ways run at the same time on the same machine (so that both see
//! the same load from anything else running there), each with its own
//! fresh release `sticky run` with real Socket.IO workers
//! (`e2e/workers/node-worker.js`, sessions registered by the integration)
//! and the soak client (`e2e/soak/client.js`): N sessions (a third each
//! long-polling, WebSocket, polling then upgrade), each echoing with an ack
//! every 2 s and ending by itself after 10-40 s, a new one taking its place
//! (page views). A third of the way into the run, the deploy:
//! - restart: SIGTERM to each worker in turn, the next once sticky has
//!   restarted the previous one (a rolling restart);
//! - reload: `sticky reload` with `--drain` (default 60 s, longer than any
//!   session's life).
//!
//! Reported per way: sessions cut (ended by their server, not by their own
//! end) and messages lost (ack timed out after 10 s), in the deploy (from
//! its start until the last old process is gone, plus the 10 s ack
//! timeout) and outside it, and reconnects. Cuts and losses outside the
//! deploy are the machine's own (on a loaded 2-CPU machine a ping or an
//! ack timeout is sometimes missed).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    flags,
    soak::{self, Sticky},
};

const USAGE: &str =
    "usage: cargo xtask deploy [--sessions N] [--workers N] [--seconds N] [--drain-s N]";
/// Each session's life, in ms: the client's --lifetime-ms.
const LIFETIME_MS: &str = "10000-40000";
const INTERVAL_MS: u32 = 2000;
/// The client's ack timeout: a loss is seen this long after the send.
const ACK_TIMEOUT_S: f64 = 10.0;

struct Options {
    sessions: u32,
    workers: u32,
    seconds: u32,
    drain_s: u32,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        sessions: 2000,
        workers: 4,
        seconds: 150,
        drain_s: 60,
    };
    for flag in flags::pairs(args, USAGE) {
        let flag = flag?;
        match flag.name {
            "--sessions" => o.sessions = flag.value()?,
            "--workers" => o.workers = flag.value()?,
            "--seconds" => o.seconds = flag.value()?,
            "--drain-s" => o.drain_s = flag.value()?,
            _ => return Err(flag.unknown()),
        }
    }
    if o.sessions == 0 || o.workers == 0 || o.seconds < 30 || o.drain_s == 0 {
        return Err(format!(
            "values must be positive, --seconds at least 30\n{USAGE}"
        ));
    }
    Ok(o)
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Restart,
    Reload,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Restart => "restart workers",
            Way::Reload => "sticky reload",
        }
    }
}

/// One way's figures.
struct Outcome {
    way: Way,
    result: Value,
    /// When the deploy started, in seconds of the client's run.
    deploy_at: f64,
    /// From the deploy's start until every worker runs the new process
    /// (reload: until the last old process is gone).
    deploy_s: f64,
}

pub fn deploy(args: &[String]) -> Result<(), String> {
    let o = options(args)?;
    let root = soak::prepare("the deploy benchmark")?;
    let out = root.join("target/deploy");
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    println!(
        "deploy: {} workers, {} sessions living 10-40 s each, one echo per 2 s; \
         the deploy at t={} s of {} s",
        o.workers,
        o.sessions,
        o.seconds / 3,
        o.seconds
    );
    let (root, o, out) = (&root, &o, &out);
    let outcomes = std::thread::scope(|scope| {
        let ways =
            [Way::Restart, Way::Reload].map(|way| scope.spawn(move || one_way(root, o, way, out)));
        ways.map(|w| {
            w.join()
                .unwrap_or_else(|_| Err("a deploy thread panicked".into()))
        })
    });
    let outcomes = outcomes.into_iter().collect::<Result<Vec<_>, _>>()?;
    report(o, &outcomes);
    Ok(())
}

fn one_way(root: &Path, o: &Options, way: Way, out: &Path) -> Result<Outcome, String> {
    let tag = match way {
        Way::Restart => "restart",
        Way::Reload => "reload",
    };
    let control = out.join(format!("{tag}.sock"));
    let log_path = out.join(format!("{tag}.log"));
    let drain = format!("{}s", o.drain_s);
    let mut sticky = Sticky::start(root, o.workers, &["--drain", &drain], &control, &log_path)?;
    let mut client = Command::new("node")
        .current_dir(root)
        .arg("e2e/soak/client.js")
        .args(["--url", &format!("http://{}", sticky.addr)])
        .args(["--sessions", &o.sessions.to_string()])
        .args(["--seconds", &o.seconds.to_string()])
        .args(["--interval-ms", &INTERVAL_MS.to_string()])
        .args(["--lifetime-ms", LIFETIME_MS])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the client: {e}"))?;
    let stdout = client.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut result = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(json) = line.strip_prefix("SOAK_RESULT ") {
                result = serde_json::from_str::<Value>(json).ok();
            } else if let Some(json) = line.strip_prefix("SOAK_PROGRESS ") {
                if let Ok(v) = serde_json::from_str::<Value>(json) {
                    println!(
                        "deploy [{tag}]: t={:.0}s connected {} sent {} lost {} cut {}",
                        v["t"].as_f64().unwrap_or(0.0),
                        v["connectedNow"],
                        v["sent"],
                        v["lost"],
                        v["cut"]
                    );
                }
            }
        }
        result
    });
    let spawned = Instant::now();
    std::thread::sleep(Duration::from_secs(u64::from(o.seconds / 3)));
    let started = Instant::now();
    let deploy_at = (started - spawned).as_secs_f64();
    let deployed = match way {
        Way::Restart => rolling_restart(&control, o.workers),
        Way::Reload => reload(&control, &mut sticky),
    };
    let deploy_s = started.elapsed().as_secs_f64();
    let status = client.wait().map_err(|e| e.to_string())?;
    let result = reader.join().ok().flatten();
    sticky.stop();
    deployed?;
    if !status.success() {
        return Err(format!(
            "the client failed ({status}); see {}",
            log_path.display()
        ));
    }
    let result = result.ok_or("the client printed no SOAK_RESULT")?;
    Ok(Outcome {
        way,
        result,
        deploy_at,
        deploy_s,
    })
}

/// SIGTERM to each worker in turn; the next once sticky runs a new process.
fn rolling_restart(control: &Path, workers: u32) -> Result<(), String> {
    for i in 0..workers as usize {
        let old = soak::worker_pid(control, i).ok_or(format!("worker {i} has no pid"))?;
        soak::send_signal(old, soak::SIGTERM);
        wait_until(Duration::from_secs(30), || {
            soak::worker_pid(control, i).is_some_and(|p| p != old)
        })
        .map_err(|_| format!("worker {i} was not restarted within 30 s"))?;
    }
    Ok(())
}

/// `sticky reload`, then until the old generation has gone.
fn reload(control: &Path, sticky: &mut Sticky) -> Result<(), String> {
    let answer = control_line(control, "reload")?;
    if !answer.starts_with("ok ") {
        return Err(format!("sticky reload: {answer}"));
    }
    println!("deploy [reload]: {answer}");
    wait_until(Duration::from_secs(600), || {
        !sticky.log_lines("reload done").is_empty()
    })
    .map_err(|_| "the drain did not end".to_owned())
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Result<(), ()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn control_line(control: &Path, line: &str) -> Result<String, String> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(control)
        .map_err(|e| format!("cannot reach sticky at {}: {e}", control.display()))?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    Ok(answer.trim_end().to_owned())
}

/// `lostAt` or `cutAt` counts (by second of the run) before, during and
/// after the deploy. A message sent up to one ack timeout before the
/// deploy may be lost to it; a session may be cut until its last old
/// process is gone (plus the ack timeout, for losses).
fn by_phase(w: &Outcome, key: &str) -> [u64; 3] {
    let mut phases = [0; 3];
    let Some(at) = w.result[key].as_object() else {
        return phases;
    };
    let end = w.deploy_at + w.deploy_s + ACK_TIMEOUT_S;
    for (second, count) in at {
        let t: f64 = second.parse().unwrap_or(0.0);
        let phase = if t + ACK_TIMEOUT_S < w.deploy_at {
            0
        } else if t <= end {
            1
        } else {
            2
        };
        phases[phase] += count.as_u64().unwrap_or(0);
    }
    phases
}

fn report(o: &Options, outcomes: &[Outcome]) {
    let n = |r: &Value, k: &str| r[k].as_u64().unwrap_or(0);
    println!(
        "\ndeploy results: {} workers, {} concurrent sessions (10-40 s each), --drain {}s",
        o.workers, o.sessions, o.drain_s
    );
    println!(
        "  {:<16} {:>8} {:>9} {:>6} {:>9} {:>6} {:>13} {:>6} {:>11} {:>9}",
        "way",
        "sessions",
        "cut: in",
        "others",
        "sent",
        "lost:",
        "in the deploy",
        "others",
        "reconnects",
        "deploy s"
    );
    for w in outcomes {
        let r = &w.result;
        let [before, during, after] = by_phase(w, "lostAt");
        let [cut_before, cut_during, cut_after] = by_phase(w, "cutAt");
        println!(
            "  {:<16} {:>8} {:>9} {:>6} {:>9} {:>6} {:>13} {:>6} {:>11} {:>9.1}",
            w.way.name(),
            n(r, "connects") - n(r, "reconnects"),
            cut_during,
            cut_before + cut_after,
            n(r, "sent"),
            n(r, "lost"),
            format!(
                "{during} ({:.2}%)",
                100.0 * during as f64 / n(r, "sent").max(1) as f64
            ),
            before + after,
            n(r, "reconnects"),
            w.deploy_s
        );
    }
    let find = |way: Way| outcomes.iter().find(|w| w.way == way);
    if let (Some(reload), Some(restart)) = (find(Way::Reload), find(Way::Restart)) {
        println!(
            "  in the deploy, sticky reload vs restart: {} vs {} sessions cut, {} vs {} messages lost",
            by_phase(reload, "cutAt")[1],
            by_phase(restart, "cutAt")[1],
            by_phase(reload, "lostAt")[1],
            by_phase(restart, "lostAt")[1]
        );
    }
}
