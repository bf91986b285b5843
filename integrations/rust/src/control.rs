//! Client for sticky's control socket (`$STICKY_CONTROL`).
//!
//! The protocol is one newline-terminated ASCII line per request (`open
//! <sid>`, `close <sid>`, `stats`) and one line per answer (`ok ...` or
//! `err <reason>`), in order, on a unix stream connection. The supervisor
//! identifies the worker by the connection's peer credentials, so the
//! connection is opened by this process and kept for its lifetime.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

/// Environment variable naming the control socket; set by `sticky run`.
pub const CONTROL_ENV: &str = "STICKY_CONTROL";

/// Longest answer line accepted from the supervisor (its `stats` answer
/// grows with the number of workers: 256 workers fit well within this).
const MAX_ANSWER: u64 = 64 * 1024;

/// The supervisor's answer to this worker after it was restarted: the
/// connection belongs to the previous process; open a new one.
const RECONNECT_HINT: &str = "reconnect";

/// Why a control request failed.
#[derive(Debug)]
pub enum ControlError {
    /// The sid is not 1..64 bytes of `[A-Za-z0-9_-]`; nothing was sent.
    InvalidSid,
    /// Connecting, writing or reading failed (after one reconnection).
    Io(io::Error),
    /// No answer within the request timeout (after one reconnection).
    Timeout,
    /// The supervisor answered `err <reason>`.
    Refused(String),
    /// The supervisor answered something that is neither `ok` nor `err`.
    Protocol(String),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::InvalidSid => {
                f.write_str("invalid sid (expected 1..64 bytes of [A-Za-z0-9_-])")
            }
            ControlError::Io(e) => write!(f, "control socket: {e}"),
            ControlError::Timeout => f.write_str("control socket: no answer in time"),
            ControlError::Refused(reason) => write!(f, "refused by sticky: {reason}"),
            ControlError::Protocol(line) => write!(f, "unexpected answer from sticky: {line:?}"),
        }
    }
}

impl std::error::Error for ControlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ControlError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Whether sticky accepts `sid` as a session id: 1..64 bytes of
/// `[A-Za-z0-9_-]` (Engine.IO ids always are).
pub fn valid_sid(sid: &str) -> bool {
    (1..=64).contains(&sid.len())
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

/// A persistent connection to sticky's control socket.
///
/// Requests are serialized (one in flight at a time, in FIFO order), which
/// is what the line protocol needs; each costs one round trip to the
/// supervisor. A broken connection (EOF, I/O error, timeout, or the
/// supervisor's `err worker restarted; reconnect`) is dropped and the
/// request is retried once on a new one; `open` and `close` are idempotent
/// for the same worker, so a retry is harmless.
pub struct ControlClient {
    path: PathBuf,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
}

impl fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlClient")
            .field("path", &self.path)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ControlClient {
    /// A client for the socket at `path`. Nothing is connected until the
    /// first request.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ControlClient {
            path: path.into(),
            timeout: Duration::from_secs(5),
            conn: Mutex::new(None),
        }
    }

    /// A client for `$STICKY_CONTROL`, or `None` when it is unset or empty
    /// (the process is not running under `sticky run`).
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os(CONTROL_ENV)?;
        if path.is_empty() {
            return None;
        }
        Some(ControlClient::new(PathBuf::from(path)))
    }

    /// How long one attempt (connect, write, read the answer) may take.
    /// Default 5 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The control socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `open <sid>`: returns once sticky routes the sid to this worker.
    pub async fn open(&self, sid: &str) -> Result<(), ControlError> {
        if !valid_sid(sid) {
            return Err(ControlError::InvalidSid);
        }
        self.request(&format!("open {sid}")).await.map(drop)
    }

    /// `close <sid>`: sticky forgets the sid (`ok` also if it was unknown).
    pub async fn close(&self, sid: &str) -> Result<(), ControlError> {
        if !valid_sid(sid) {
            return Err(ControlError::InvalidSid);
        }
        self.request(&format!("close {sid}")).await.map(drop)
    }

    /// `stats`: the text after `ok `.
    pub async fn stats(&self) -> Result<String, ControlError> {
        self.request("stats").await
    }

    /// Sends one request line (without its newline) and returns the text
    /// after `ok` (trimmed), or the error.
    pub async fn request(&self, line: &str) -> Result<String, ControlError> {
        if line.contains('\n') || line.contains('\r') {
            return Err(ControlError::Protocol(
                "request contains a line break".into(),
            ));
        }
        let mut request = String::with_capacity(line.len() + 1);
        request.push_str(line);
        request.push('\n');

        let mut conn = self.conn.lock().await;
        let mut last_error = None;
        for _attempt in 0..2 {
            let answer =
                tokio::time::timeout(self.timeout, self.exchange(&mut conn, &request)).await;
            let answer = match answer {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    *conn = None;
                    last_error = Some(ControlError::Io(e));
                    continue;
                }
                Err(_elapsed) => {
                    *conn = None;
                    last_error = Some(ControlError::Timeout);
                    continue;
                }
            };
            match parse_answer(&answer) {
                Err(ControlError::Refused(reason)) if reason.ends_with(RECONNECT_HINT) => {
                    *conn = None;
                    last_error = Some(ControlError::Refused(reason));
                }
                other => return other,
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// One attempt: connects if needed, writes the request, reads one line.
    async fn exchange(&self, conn: &mut Option<Conn>, request: &str) -> io::Result<String> {
        if conn.is_none() {
            let stream = UnixStream::connect(&self.path).await?;
            let (reader, writer) = stream.into_split();
            *conn = Some(Conn {
                reader: BufReader::new(reader),
                writer,
            });
        }
        let c = conn.as_mut().expect("connected above");
        c.writer.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        let n = (&mut c.reader)
            .take(MAX_ANSWER)
            .read_until(b'\n', &mut answer)
            .await?;
        if n == 0 || answer.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "control connection closed before a full answer",
            ));
        }
        answer.pop();
        if answer.last() == Some(&b'\r') {
            answer.pop();
        }
        String::from_utf8(answer)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "answer is not UTF-8"))
    }
}

/// `ok[ text]` → `Ok(text)`, `err reason` → `Refused(reason)`.
fn parse_answer(line: &str) -> Result<String, ControlError> {
    if line == "ok" {
        return Ok(String::new());
    }
    if let Some(rest) = line.strip_prefix("ok ") {
        return Ok(rest.trim().to_owned());
    }
    if line == "err" {
        return Err(ControlError::Refused(String::new()));
    }
    if let Some(reason) = line.strip_prefix("err ") {
        return Err(ControlError::Refused(reason.trim().to_owned()));
    }
    Err(ControlError::Protocol(line.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::net::UnixListener;

    fn socket_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sticky-socketioxide-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("control.sock")
    }

    enum Fake {
        Say(&'static str),
        SayOwned(String),
        /// Close the connection without answering.
        Hang,
        /// Keep the connection, never answer.
        Mute,
    }

    /// A fake supervisor: answers each line with `answer(line, conn_no)`.
    fn fake_supervisor(
        path: &Path,
        answer: impl Fn(&str, usize) -> Fake + Send + Sync + 'static,
    ) -> (Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = UnixListener::bind(path).unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let (conns2, lines2) = (conns.clone(), lines.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let conn_no = conns2.fetch_add(1, Ordering::SeqCst);
                let (answer, lines) = (answer.clone(), lines2.clone());
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r).lines();
                    while let Ok(Some(line)) = r.next_line().await {
                        lines.lock().unwrap().push(line.clone());
                        let a = match answer(&line, conn_no) {
                            Fake::Say(a) => a.to_owned(),
                            Fake::SayOwned(a) => a,
                            Fake::Hang => return,
                            Fake::Mute => continue,
                        };
                        w.write_all(format!("{a}\n").as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (conns, lines)
    }

    #[tokio::test]
    async fn open_close_stats_on_one_connection() {
        let path = socket_path("basic");
        let (conns, lines) = fake_supervisor(&path, |line, _| {
            if line == "stats" {
                Fake::Say("ok sessions=1 workers=2")
            } else {
                Fake::Say("ok")
            }
        });
        let client = ControlClient::new(&path);
        client.open("abc_DEF-123").await.unwrap();
        client.close("abc_DEF-123").await.unwrap();
        assert_eq!(client.stats().await.unwrap(), "sessions=1 workers=2");
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one persistent connection");
        assert_eq!(
            *lines.lock().unwrap(),
            ["open abc_DEF-123", "close abc_DEF-123", "stats"]
        );
    }

    #[tokio::test]
    async fn err_answers_are_refusals() {
        let path = socket_path("refused");
        fake_supervisor(&path, |_, _| Fake::Say("err sid owned by another worker"));
        let client = ControlClient::new(&path);
        match client.open("abc").await {
            Err(ControlError::Refused(r)) => assert_eq!(r, "sid owned by another worker"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn invalid_sids_are_not_sent() {
        let path = socket_path("invalid");
        let (conns, _) = fake_supervisor(&path, |_, _| Fake::Say("ok"));
        let client = ControlClient::new(&path);
        for sid in ["", "a b", "a/b", "é", &"x".repeat(65), "a\nstats"] {
            assert!(
                matches!(client.open(sid).await, Err(ControlError::InvalidSid)),
                "{sid:?}"
            );
        }
        assert!(client.open(&"x".repeat(64)).await.is_ok());
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn reconnects_after_the_connection_drops() {
        let path = socket_path("drop");
        // The first connection dies on its second request without answering.
        let (conns, lines) = fake_supervisor(&path, |line, conn| {
            if conn == 0 && line.starts_with("close") {
                Fake::Hang
            } else {
                Fake::Say("ok")
            }
        });
        let client = ControlClient::new(&path);
        client.open("s1").await.unwrap();
        client.close("s1").await.unwrap();
        client.open("s2").await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        assert_eq!(
            *lines.lock().unwrap(),
            ["open s1", "close s1", "close s1", "open s2"]
        );
    }

    #[tokio::test]
    async fn reconnects_when_told_the_worker_restarted() {
        let path = socket_path("restarted");
        let (conns, _) = fake_supervisor(&path, |_, conn| {
            if conn == 0 {
                Fake::Say("err worker restarted; reconnect")
            } else {
                Fake::Say("ok")
            }
        });
        let client = ControlClient::new(&path);
        client.open("s1").await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn times_out_and_recovers() {
        let path = socket_path("timeout");
        // The first connection never answers; later ones do.
        let (conns, _) = fake_supervisor(&path, |_, conn| {
            if conn == 0 {
                Fake::Mute
            } else {
                Fake::Say("ok")
            }
        });
        let client = ControlClient::new(&path).with_timeout(Duration::from_millis(100));
        client.open("s1").await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn missing_socket_is_an_io_error() {
        let path = socket_path("missing");
        let client = ControlClient::new(&path);
        assert!(matches!(client.open("s1").await, Err(ControlError::Io(_))));
        // A supervisor that appears later is used.
        fake_supervisor(&path, |_, _| Fake::Say("ok"));
        client.open("s1").await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_answers() {
        let path = socket_path("concurrent");
        fake_supervisor(&path, |line, _| {
            let sid = line.split_once(' ').unwrap().1;
            if sid.ends_with('7') {
                Fake::SayOwned(format!("err no {sid}"))
            } else {
                Fake::Say("ok")
            }
        });
        let client = Arc::new(ControlClient::new(&path));
        let mut tasks = Vec::new();
        for i in 0..100 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                (i, client.open(&format!("sid{i}")).await)
            }));
        }
        for t in tasks {
            let (i, result) = t.await.unwrap();
            match result {
                Ok(()) => assert_ne!(i % 10, 7),
                Err(ControlError::Refused(r)) => assert_eq!(r, format!("no sid{i}")),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer("ok").unwrap(), "");
        assert_eq!(parse_answer("ok a=1 b=2").unwrap(), "a=1 b=2");
        assert!(matches!(parse_answer("err x y"), Err(ControlError::Refused(r)) if r == "x y"));
        assert!(matches!(
            parse_answer("okay"),
            Err(ControlError::Protocol(_))
        ));
        assert!(matches!(parse_answer(""), Err(ControlError::Protocol(_))));
    }
}
