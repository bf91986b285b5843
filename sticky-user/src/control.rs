//! The control socket: workers report their sessions here.
//!
//! Protocol (newline-terminated ASCII lines, one answer line each):
//! - `open <sid>` / `close <sid>`: answered `ok` once the kernel map holds
//!   the change, or `err <reason>`. Only workers (and their descendants) may
//!   send them; the sender is identified by `SO_PEERCRED`, never by what it
//!   says.
//! - `stats`: `ok <counters> ...`; allowed to workers and to processes of the
//!   supervisor's own uid or root, for operators and tests.
//! - `reload`: starts a new generation of workers (`supervisor::reload`);
//!   `ok <what started>` or `err <why not>`. Only for processes of the
//!   supervisor's own uid or root that are not workers (a worker asking to
//!   replace itself would be a loop).
//!
//! A peer that is not a worker gets one answer and is disconnected; it has
//! `OTHER_TIMEOUT` to send its line, and such peers have their own, small
//! connection cap, so idle strangers cannot lock workers out. Lines are
//! capped at `MAX_LINE` bytes; a longer one ends the connection.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::mpsc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    identity::RunAs,
    resets::ResetStats,
    sessions::{SessionTable, WorkerId},
    steering::Counters,
    supervisor::Event,
};

const MAX_LINE: usize = 1024;
/// Connections from workers (and their descendants).
const MAX_WORKER_CONNECTIONS: usize = 1024;
/// Connections from anyone else (operators' `stats`, strangers).
const MAX_OTHER_CONNECTIONS: usize = 64;
/// Connections not yet identified (not a known worker at first sight).
const MAX_IDENTIFYING: usize = 256;
/// A worker may connect before the supervisor has recorded its pid: ask the
/// table this many times, 10 ms apart, before calling the peer a stranger.
const IDENTIFY_ATTEMPTS: usize = 20;
const OTHER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct ControlSocket {
    pub path: PathBuf,
    listener: UnixListener,
}

/// What a control connection can reach.
#[derive(Clone)]
pub struct ControlState {
    pub sessions: Arc<Mutex<SessionTable>>,
    pub counters: Arc<Counters>,
    /// The broadcast relay, whose counters `stats` reports too.
    pub relay: Option<Arc<crate::relay::Relay>>,
    pub resets: Arc<ResetStats>,
    /// `--placement bpf-cookie`'s counters, when it runs.
    pub cookies: Option<Arc<crate::reqsk::CookieCounters>>,
    /// The supervisor's event channel, for `reload`.
    pub reload: mpsc::Sender<Event>,
}

/// Binds a unix stream socket at `path` (`what` names it in errors),
/// replacing a stale socket file but never a live one. Anyone may connect:
/// workers may run as another user, and peers are told apart by their
/// credentials, never by the file's mode.
pub fn bind_unix_socket(path: &Path, what: &str) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "{what} {} is in use by a running sticky; pass another --control path",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {what} {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

impl ControlSocket {
    /// Binds `path`, replacing a stale socket file but never a live one.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        let listener = bind_unix_socket(path, "control socket")?;
        Ok(ControlSocket {
            path: path.to_owned(),
            listener,
        })
    }

    /// With `--user`: the socket belongs to the workers' group, mode 0660,
    /// so those workers (and root, and sticky's own uid) can connect and
    /// other users cannot; checks that the workers can reach its directory.
    pub fn only_for(&self, run_as: &RunAs) -> Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        for dir in self
            .path
            .ancestors()
            .skip(1)
            .filter(|d| !d.as_os_str().is_empty())
        {
            let meta =
                std::fs::metadata(dir).with_context(|| format!("checking {}", dir.display()))?;
            let mode = meta.mode();
            let searchable = run_as.uid == 0
                || (meta.uid() == run_as.uid && mode & 0o100 != 0)
                || (run_as.groups.contains(&meta.gid()) && mode & 0o010 != 0)
                || mode & 0o001 != 0;
            if !searchable {
                bail!(
                    "control socket {} is out of reach of --user {}: it cannot enter {}; pass --control with a path it can reach (e.g. /run/sticky/control.sock)",
                    self.path.display(),
                    run_as.user,
                    dir.display()
                );
            }
        }
        std::os::unix::fs::chown(&self.path, None, Some(run_as.gid))
            .with_context(|| format!("giving {} to the workers' group", self.path.display()))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o660))?;
        Ok(())
    }

    /// Serves connections on background threads for as long as the
    /// returned guard lives; dropping it removes the socket file.
    pub fn serve(self, state: ControlState) -> RemoveOnDrop {
        let guard = RemoveOnDrop(self.path.clone());
        let limits = Arc::new(Limits::default());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in self.listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let Ok(cred) = peer_cred(&stream) else {
                        continue;
                    };
                    // A known worker is recognised here at once, in order, so
                    // strangers waiting to be identified cannot crowd it out.
                    let known = identify(&state, cred.pid as u32, 1);
                    let identifying = match known {
                        Some(_) => None,
                        None => match Slot::take(&limits.identifying, MAX_IDENTIFYING) {
                            Some(slot) => Some(slot),
                            None => continue, // dropping the stream closes it
                        },
                    };
                    let (state, limits) = (state.clone(), limits.clone());
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || admit(stream, cred, known, &state, &limits, identifying));
                }
            })
            .expect("spawning the control thread");
        guard
    }
}

#[derive(Default)]
struct Limits {
    identifying: Arc<AtomicUsize>,
    workers: Arc<AtomicUsize>,
    others: Arc<AtomicUsize>,
}

/// One unit of a capped count, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        if count.fetch_add(1, Ordering::Relaxed) >= max {
            count.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Identifies the peer (unless already known), then serves it under its
/// class's cap.
fn admit(
    stream: UnixStream,
    cred: libc::ucred,
    known: Option<WorkerId>,
    state: &ControlState,
    limits: &Limits,
    identifying: Option<Slot>,
) {
    let worker = known.or_else(|| identify(state, cred.pid as u32, IDENTIFY_ATTEMPTS));
    drop(identifying);
    let class = match worker {
        Some(_) => Slot::take(&limits.workers, MAX_WORKER_CONNECTIONS),
        None => Slot::take(&limits.others, MAX_OTHER_CONNECTIONS),
    };
    let Some(_class) = class else { return };
    if worker.is_none() && stream.set_read_timeout(Some(OTHER_TIMEOUT)).is_err() {
        return;
    }
    let _ = serve_connection(stream, state, cred, worker);
}

/// Removes the socket file when the supervisor exits.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn serve_connection(
    stream: UnixStream,
    state: &ControlState,
    cred: libc::ucred,
    worker: Option<WorkerId>,
) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let reason = if n > MAX_LINE {
                "line too long"
            } else {
                "unterminated line"
            };
            writer.write_all(format!("err {reason}\n").as_bytes())?;
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line[..line.len() - 1]);
        let text = text.trim_end_matches('\r');
        let reply = answer(state, worker, cred.uid, text);
        writer.write_all(reply.as_bytes())?;
        if worker.is_none() {
            return Ok(()); // not a worker: one answer, then goodbye
        }
    }
}

/// Retries briefly: a worker may connect before the supervisor has recorded
/// its pid (it runs as soon as exec succeeds).
fn identify(state: &ControlState, pid: u32, attempts: usize) -> Option<WorkerId> {
    for attempt in 0..attempts {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(id) = state.sessions.lock().unwrap().identify(pid) {
            return Some(id);
        }
    }
    None
}

fn answer(state: &ControlState, worker: Option<WorkerId>, uid: u32, line: &str) -> String {
    let (command, arg) = line.split_once(' ').unwrap_or((line, ""));
    let result = match (command, worker) {
        ("stats", _) if worker.is_some() || uid == 0 || uid == unsafe { libc::geteuid() } => {
            return format!("ok {}\n", crate::stats::snapshot(state).line());
        }
        ("reload", None) if uid == 0 || uid == unsafe { libc::geteuid() } => {
            return ask_reload(state);
        }
        ("reload", Some(_)) => Err("a worker cannot reload sticky".to_owned()),
        ("open" | "close", None) | ("stats" | "reload", None) => {
            Err("unknown peer: not a sticky worker".to_owned())
        }
        ("open", Some(id)) => state.sessions.lock().unwrap().open(id, arg),
        ("close", Some(id)) => state.sessions.lock().unwrap().close(id, arg),
        _ => Err("unknown command (expected open <sid>, close <sid>, stats or reload)".to_owned()),
    };
    match result {
        Ok(()) => "ok\n".to_owned(),
        Err(reason) => format!("err {reason}\n"),
    }
}

/// Hands `reload` to the supervisor's loop and relays its answer.
fn ask_reload(state: &ControlState) -> String {
    let (reply, answer) = mpsc::channel();
    if state.reload.send(Event::Reload(Some(reply))).is_err() {
        return "err sticky is stopping\n".to_owned();
    }
    // Starting the workers is fork/exec only; the wait is short.
    answer
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| "err no answer from the supervisor within 30 s\n".to_owned())
}

/// The peer's credentials (`SO_PEERCRED`): how every peer of sticky's unix
/// sockets is identified.
pub fn peer_cred(stream: &UnixStream) -> std::io::Result<libc::ucred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writing, sized for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if cred.pid == 0 {
        return Err(std::io::Error::other("peer has no pid"));
    }
    Ok(cred)
}
