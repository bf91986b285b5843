//! `cargo xtask soak [--minutes N] [--sessions N] [--workers N] [--interval-ms N]`:
//! a long run (not part of CI) of real Socket.IO workers (Node.js,
//! `e2e/workers/node-worker.js` with the sticky integration) behind a
//! release `sticky run`, with real socket.io-client sessions
//! (`e2e/soak/client.js`, a third long-polling, a third WebSocket, a third
//! polling then upgrade) sending sequence-numbered acknowledged echoes.
//! Every minute one worker is restarted, round-robin, alternately by SIGKILL
//! and SIGTERM. The supervisor's RSS is sampled from /proc.
//!
//! Reports messages sent / acknowledged / lost (and whether each loss falls
//! within a restart's window), sessions re-established, and RSS start / end /
//! max. Fails on a loss outside a restart window, a wrong echo, a session
//! answered by another worker, or RSS growth beyond the margin.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::flags;

const USAGE: &str =
    "usage: cargo xtask soak [--minutes N] [--sessions N] [--workers N] [--interval-ms N]";
/// One worker restart per this period, as the issue asks.
const RESTART_EVERY: Duration = Duration::from_secs(60);
/// A message lost (ack timed out) that was sent this soon after a restart
/// (or just before it) is accounted to that restart.
const RESTART_WINDOW: (f64, f64) = (-12.0, 20.0);
const RSS_EVERY: Duration = Duration::from_secs(5);
/// RSS may grow by this fraction plus this many KiB between the early and the
/// late part of the run.
const RSS_MARGIN: (f64, u64) = (0.25, 4096);

struct Options {
    minutes: f64,
    sessions: u32,
    workers: u32,
    interval_ms: u32,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        minutes: 10.0,
        sessions: 2000,
        workers: 4,
        interval_ms: 2000,
    };
    for flag in flags::pairs(args, USAGE) {
        let flag = flag?;
        match flag.name {
            "--minutes" => o.minutes = flag.value()?,
            "--sessions" => o.sessions = flag.value()?,
            "--workers" => o.workers = flag.value()?,
            "--interval-ms" => o.interval_ms = flag.value()?,
            _ => return Err(flag.unknown()),
        }
    }
    if o.minutes <= 0.0 || o.sessions == 0 || o.workers == 0 || o.interval_ms == 0 {
        return Err(format!("every value must be positive\n{USAGE}"));
    }
    Ok(o)
}

pub fn soak(args: &[String]) -> Result<(), String> {
    let o = options(args)?;
    let root = prepare("the soak")?;
    let out = root.join("target/soak");
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let control = out.join("control.sock");
    let log_path = out.join("sticky.log");

    let mut sticky = Sticky::start(&root, o.workers, &[], &control, &log_path)?;
    let result = drive(&root, &o, &mut sticky, &control);
    sticky.stop();
    println!("soak: sticky's log is in {}", log_path.display());
    result
}

/// What the soak and `deploy` need before they start: root (they load BPF
/// programs), Node.js, the release build and e2e/'s npm packages. `what`
/// names the sub-command in the errors. Returns the repository's root.
pub(crate) fn prepare(what: &str) -> Result<PathBuf, String> {
    if !crate::is_root() {
        return Err(format!("{what} loads BPF programs: run it as root"));
    }
    if crate::find_in_path("node").is_none() {
        return Err(format!("{what} needs Node.js (node) on PATH"));
    }
    crate::build_release()?;
    let root = crate::root_dir();
    if !root.join("e2e/node_modules").exists() {
        let mut npm = Command::new("npm");
        npm.current_dir(root.join("e2e"))
            .args(["ci", "--no-audit", "--no-fund"]);
        crate::status(npm, "npm ci in e2e/")?;
    }
    Ok(root)
}

fn drive(root: &Path, o: &Options, sticky: &mut Sticky, control: &Path) -> Result<(), String> {
    let seconds = (o.minutes * 60.0).round() as u64;
    println!(
        "soak: {} workers, {} sessions, {seconds} s, one echo per session every {} ms, \
         a worker restarted every {RESTART_EVERY:?}; sticky on {}",
        o.workers, o.sessions, o.interval_ms, sticky.addr
    );
    let mut client = Command::new("node")
        .current_dir(root)
        .arg("e2e/soak/client.js")
        .args(["--url", &format!("http://{}", sticky.addr)])
        .args(["--sessions", &o.sessions.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .args(["--interval-ms", &o.interval_ms.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the soak client: {e}"))?;
    let result: Arc<Mutex<Option<Value>>> = Arc::default();
    let stdout = client.stdout.take().expect("piped stdout");
    let sink = result.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(json) = line.strip_prefix("SOAK_PROGRESS ") {
                if let Ok(v) = serde_json::from_str::<Value>(json) {
                    println!("soak: {}", progress_line(&v));
                }
            } else if let Some(json) = line.strip_prefix("SOAK_RESULT ") {
                *sink.lock().unwrap() = serde_json::from_str(json).ok();
            } else {
                println!("client: {line}");
            }
        }
    });

    let start = Instant::now();
    let mut rss = Vec::new();
    let mut restarts: Vec<(f64, usize, &str)> = Vec::new();
    let mut next_rss = start;
    let mut next_restart = start + RESTART_EVERY;
    let client_status = loop {
        if let Some(status) = client.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        let now = Instant::now();
        if now >= next_rss {
            if let Some(kib) = rss_kib(sticky.child.id()) {
                rss.push((start.elapsed().as_secs_f64(), kib));
            }
            next_rss += RSS_EVERY;
        }
        // No restart in the last 20 s: let the run end on a settled state.
        if now >= next_restart && start.elapsed().as_secs() + 20 < seconds {
            let n = restarts.len();
            let worker = n % o.workers as usize;
            let (sig, name) = if n.is_multiple_of(2) {
                (SIGKILL, "SIGKILL")
            } else {
                (SIGTERM, "SIGTERM")
            };
            match worker_pid(control, worker) {
                Some(pid) => {
                    let t = start.elapsed().as_secs_f64();
                    send_signal(pid, sig);
                    println!("soak: t={t:.0}s {name} to worker {worker} (pid {pid})");
                    restarts.push((t, worker, name));
                }
                None => println!("soak: worker {worker} has no pid right now; restart skipped"),
            }
            next_restart += RESTART_EVERY;
        }
        if !sticky.running() {
            let _ = client.kill();
            return Err("sticky exited during the soak (see its log)".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = reader.join();
    if !client_status.success() {
        return Err(format!("the soak client failed ({client_status})"));
    }
    let result = result
        .lock()
        .unwrap()
        .take()
        .ok_or("the soak client printed no SOAK_RESULT")?;
    report(&result, &restarts, &rss, &sticky.log_lines("restarted"))
}

fn progress_line(v: &Value) -> String {
    format!(
        "t={:.0}s connected {} sent {} acked {} lost {} reconnects {} connect_errors {}",
        v["t"].as_f64().unwrap_or(0.0),
        v["connectedNow"],
        v["sent"],
        v["acked"],
        v["lost"],
        v["reconnects"],
        v["connectErrors"]
    )
}

fn report(
    r: &Value,
    restarts: &[(f64, usize, &str)],
    rss: &[(f64, u64)],
    restarted_lines: &[String],
) -> Result<(), String> {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    // Losses by the second they were sent: inside a restart's window or not.
    let mut lost_in_window = 0;
    let mut lost_outside = Vec::new();
    if let Some(at) = r["lostAt"].as_object() {
        for (second, count) in at {
            let t: f64 = second.parse().unwrap_or(-1.0);
            let count = count.as_u64().unwrap_or(0);
            let explained = restarts
                .iter()
                .any(|(rt, _, _)| t - rt >= RESTART_WINDOW.0 && t - rt <= RESTART_WINDOW.1);
            if explained {
                lost_in_window += count;
            } else {
                lost_outside.push((t, count));
            }
        }
    }
    let lost_outside_total: u64 = lost_outside.iter().map(|(_, c)| c).sum();
    println!("\nsoak results");
    println!(
        "  messages: sent {} acked {} lost {} ({lost_in_window} within a restart's window, \
         {lost_outside_total} outside), wrong echoes {}",
        n("sent"),
        n("acked"),
        n("lost"),
        n("wrongEcho")
    );
    println!(
        "  sessions: {} opened, {} connects, {} re-established, connected at the end {}, \
         connect_error {}, \"Session ID unknown\" {}, answered by another worker {}",
        n("sessions"),
        n("connects"),
        n("reconnects"),
        n("connectedNow"),
        n("connectErrors"),
        n("sessionIdUnknown"),
        n("otherWorker")
    );
    println!("  disconnect reasons: {}", r["disconnects"]);
    println!(
        "  worker restarts: {} sent ({}), {} restarts logged by sticky",
        restarts.len(),
        restarts
            .iter()
            .map(|(t, w, s)| format!("t={t:.0}s w{w} {s}"))
            .collect::<Vec<_>>()
            .join(", "),
        restarted_lines.len()
    );
    let mut failures = Vec::new();
    match rss_verdict(rss) {
        Some((line, ok)) => {
            println!("  supervisor RSS: {line}");
            if !ok {
                failures.push(format!("supervisor RSS grew: {line}"));
            }
        }
        None => println!("  supervisor RSS: too few samples"),
    }
    if lost_outside_total > 0 {
        failures.push(format!(
            "{lost_outside_total} messages lost outside any restart window (second sent, count): {lost_outside:?}"
        ));
    }
    if n("wrongEcho") > 0 {
        failures.push(format!("{} wrong echoes", n("wrongEcho")));
    }
    if n("otherWorker") > 0 {
        failures.push(format!(
            "{} sessions answered by another worker",
            n("otherWorker")
        ));
    }
    if n("connectedNow") < n("sessions") {
        failures.push(format!(
            "only {} of {} sessions connected at the end",
            n("connectedNow"),
            n("sessions")
        ));
    }
    if failures.is_empty() {
        println!("soak: ok");
        Ok(())
    } else {
        Err(format!("soak failed:\n  {}", failures.join("\n  ")))
    }
}

/// "start S end E max M KiB (early median A, late median B)" and whether
/// the late part stays within the margin of the early part. The first 20%
/// of the run is warm-up (sessions opening, allocator growing).
fn rss_verdict(rss: &[(f64, u64)]) -> Option<(String, bool)> {
    if rss.len() < 5 {
        return None;
    }
    let median = |part: &[(f64, u64)]| {
        let mut v: Vec<u64> = part.iter().map(|s| s.1).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let at = |f: f64| ((rss.len() as f64 * f) as usize).min(rss.len() - 1);
    let early = median(&rss[at(0.2)..at(0.4).max(at(0.2) + 1)]);
    let late = median(&rss[at(0.8)..]);
    let max = rss.iter().map(|s| s.1).max().unwrap_or(0);
    let limit = (early as f64 * (1.0 + RSS_MARGIN.0)) as u64 + RSS_MARGIN.1;
    let line = format!(
        "start {} end {} max {max} KiB over {} samples (median {early} KiB at 20-40% of the run, \
         {late} KiB in the last 20%; limit {limit} KiB)",
        rss[0].1,
        rss[rss.len() - 1].1,
        rss.len()
    );
    Some((line, late <= limit))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Worker `i`'s pid from sticky's `stats` answer on the control socket.
pub(crate) fn worker_pid(control: &Path, i: usize) -> Option<u32> {
    let mut s = std::os::unix::net::UnixStream::connect(control).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"stats\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    let key = format!("worker{i}=pid:");
    let rest = line.split(' ').find_map(|f| f.strip_prefix(&key))?;
    rest.split(',').next()?.parse().ok()
}

// Signal numbers (Linux), without a libc dependency for two constants.
const SIGKILL: i32 = 9;
pub(crate) const SIGTERM: i32 = 15;

pub(crate) fn send_signal(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status();
}

/// The release `sticky run` under soak (and `deploy`), its stderr copied to
/// a log file.
pub(crate) struct Sticky {
    child: Child,
    pub(crate) addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Sticky {
    /// `extra`: more `sticky run` options.
    pub(crate) fn start(
        root: &Path,
        workers: u32,
        extra: &[&str],
        control: &Path,
        log_path: &PathBuf,
    ) -> Result<Sticky, String> {
        let _ = std::fs::remove_file(control);
        let mut child = Command::new(root.join("target/release/sticky"))
            .current_dir(root)
            .args(["run", "--listen", "127.0.0.1:0", "--grace", "5s"])
            .args(["--workers", &workers.to_string()])
            .arg("--control")
            .arg(control)
            .args(extra)
            .args(["--", "node", "e2e/workers/node-worker.js"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start sticky: {e}"))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let mut file = std::fs::File::create(log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = log.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split(' ').next().unwrap_or("").to_owned());
                }
                if line.starts_with("sticky: ") {
                    sink.lock().unwrap().push(line);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Ok(Sticky { child, addr, log }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("sticky did not start; see {}", log_path.display()))
            }
        }
    }

    pub(crate) fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub(crate) fn log_lines(&self, containing: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|l| l.contains(containing))
            .cloned()
            .collect()
    }

    /// SIGTERM, then wait (sticky itself SIGKILLs workers after --grace).
    pub(crate) fn stop(&mut self) {
        send_signal(self.child.id(), SIGTERM);
        let _ = self.child.wait();
    }
}
