//! The tower layer: registers Engine.IO sessions with sticky before their
//! handshake answer leaves, closes keep-alive after long-polling responses,
//! and reports sessions that ended.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use socketioxide::adapter::Adapter;
use socketioxide::socket::DisconnectReason;
use socketioxide::SocketIo;
use tower_layer::Layer;
use tower_service::Service;

use crate::control::{valid_sid, ControlClient};

type LiveFn = dyn Fn() -> HashSet<String> + Send + Sync;

/// Body of the responses of [`StickyService`]: the inner service's own body,
/// or the re-wrapped bytes of a handshake answer that was read to learn its
/// sid.
pub type StickyBody<B> = Either<B, Full<Bytes>>;

/// Tower layer that makes a socketioxide (Engine.IO) server safe to run as
/// several processes under `sticky run`. See the [crate docs](crate).
///
/// Cloning is cheap; clones share one session table and one control
/// connection.
#[derive(Clone)]
pub struct StickyLayer {
    shared: Arc<Shared>,
}

/// Builder for [`StickyLayer`], from [`StickyLayer::builder`].
pub struct StickyLayerBuilder {
    control: Option<ControlClient>,
    req_path: String,
    connection_close: Option<bool>,
    connection_close_all: bool,
    live: Option<Box<LiveFn>>,
    connect_grace: Duration,
    linger: Duration,
    sweep_interval: Duration,
}

/// Handle to report sessions by hand, from [`StickyLayer::handle`]: for
/// sessions that never pass through the layer's handshake (WebSocket-only
/// clients), or to report an end at once rather than at the next sweep.
#[derive(Clone)]
pub struct StickyHandle {
    shared: Arc<Shared>,
}

/// The service made by [`StickyLayer`].
#[derive(Clone)]
pub struct StickyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Tracked {
    since: Instant,
    /// Seen alive in some namespace by a sweep.
    seen: bool,
    /// When a sweep first found it in no namespace after it had been seen.
    gone_since: Option<Instant>,
}

impl Tracked {
    fn new(seen: bool) -> Self {
        Tracked {
            since: Instant::now(),
            seen,
            gone_since: None,
        }
    }
}

struct Shared {
    control: Option<ControlClient>,
    req_path: String,
    connection_close: bool,
    connection_close_all: bool,
    live: Option<Box<LiveFn>>,
    connect_grace: Duration,
    linger: Duration,
    sweep_interval: Duration,
    sessions: std::sync::Mutex<HashMap<String, Tracked>>,
    sweeper_started: AtomicBool,
}

impl fmt::Debug for StickyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl fmt::Debug for StickyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl<S: fmt::Debug> fmt::Debug for StickyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StickyService")
            .field("inner", &self.inner)
            .field("sticky", &self.shared)
            .finish()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sticky")
            .field("control", &self.control)
            .field("req_path", &self.req_path)
            .field("connection_close", &self.connection_close)
            .field("connection_close_all", &self.connection_close_all)
            .field("tracked", &self.sessions.lock().unwrap().len())
            .finish()
    }
}

impl StickyLayer {
    /// The layer for `io`, configured from the environment: registration is
    /// on when `$STICKY_CONTROL` is set (the process runs under `sticky
    /// run`), and a no-op otherwise.
    pub fn new<A: Adapter>(io: &SocketIo<A>) -> Self {
        Self::builder(io).build()
    }

    /// A builder starting from the same defaults as [`StickyLayer::new`].
    pub fn builder<A: Adapter>(io: &SocketIo<A>) -> StickyLayerBuilder {
        let io2 = io.clone();
        let config = io.config();
        StickyLayerBuilder {
            control: ControlClient::from_env(),
            req_path: config.engine_config.req_path.to_string(),
            connection_close: None,
            connection_close_all: false,
            live: Some(Box::new(move || live_sids(&io2))),
            connect_grace: config.connect_timeout + Duration::from_secs(5),
            linger: Duration::from_secs(2),
            sweep_interval: Duration::from_millis(500),
        }
    }

    /// A handle to open and close sessions by hand.
    pub fn handle(&self) -> StickyHandle {
        StickyHandle {
            shared: self.shared.clone(),
        }
    }

    /// The control client, when running under sticky.
    pub fn control(&self) -> Option<&ControlClient> {
        self.shared.control.as_ref()
    }
}

impl StickyLayerBuilder {
    /// The control client to use; `None` disables registration. Default:
    /// [`ControlClient::from_env`].
    pub fn control(mut self, control: Option<ControlClient>) -> Self {
        self.control = control;
        self
    }

    /// Whether Engine.IO long-polling responses carry `Connection: close`.
    /// Default: on when registering (under sticky): browsers resend a
    /// request whose kept-alive connection sticky resets, but Node's
    /// socket.io-client does not complete a resent request.
    pub fn connection_close(mut self, on: bool) -> Self {
        self.connection_close = Some(on);
        self
    }

    /// Whether every other response (not a WebSocket upgrade) carries
    /// `Connection: close` too, when long-polling ones do. Default off.
    ///
    /// Turn it on when the same workers serve other HTTP requests to
    /// browsers: a browser may reuse a kept-alive connection that a page or
    /// API request opened on one worker for a long-polling request of a
    /// session owned by another, which then gets "Session ID unknown".
    pub fn connection_close_all(mut self, on: bool) -> Self {
        self.connection_close_all = on;
        self
    }

    /// How long a registered session may go without appearing in any
    /// namespace before it is reported closed. Default: socketioxide's
    /// `connect_timeout` (after which it drops such sessions) plus 5 s.
    pub fn connect_grace(mut self, grace: Duration) -> Self {
        self.connect_grace = grace;
        self
    }

    /// How long a session that left every namespace (without its Engine.IO
    /// session being known to end) stays registered: the client usually
    /// closes the Engine.IO session right after, with one more request that
    /// must still reach this worker. Default 2 s.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// How often ended sessions are looked for. Default 500 ms.
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every.max(Duration::from_millis(10));
        self
    }

    /// The layer.
    pub fn build(self) -> StickyLayer {
        // On under sticky, resets or not: Node's socket.io-client does not
        // complete a request resent after a reset (README).
        let connection_close = self.connection_close.unwrap_or(self.control.is_some());
        StickyLayer {
            shared: Arc::new(Shared {
                control: self.control,
                req_path: self.req_path,
                connection_close,
                connection_close_all: connection_close && self.connection_close_all,
                live: self.live,
                connect_grace: self.connect_grace,
                linger: self.linger,
                sweep_interval: self.sweep_interval,
                sessions: std::sync::Mutex::new(HashMap::new()),
                sweeper_started: AtomicBool::new(false),
            }),
        }
    }
}

impl<S> Layer<S> for StickyLayer {
    type Service = StickyService<S>;

    fn layer(&self, inner: S) -> StickyService<S> {
        StickyService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Ids of every socket connected to a namespace of `io` in this process.
/// In socketioxide a socket's id is its Engine.IO session id.
fn live_sids<A: Adapter>(io: &SocketIo<A>) -> HashSet<String> {
    let mut live = HashSet::new();
    for ns in io.nsps() {
        for socket in ns.sockets() {
            if socket.connected() {
                live.insert(socket.id.to_string());
            }
        }
    }
    live
}

impl StickyHandle {
    /// Registers `sid` with sticky (no-op when not under sticky, or when the
    /// layer already registered it).
    pub async fn open(&self, sid: impl fmt::Display) -> Result<(), crate::ControlError> {
        let sid = sid.to_string();
        self.shared.ensure_sweeper();
        self.shared.open(sid, false).await
    }

    /// For `on_disconnect` handlers: reports the session closed at once when
    /// `reason` means its Engine.IO session ended ([`ends_session`]);
    /// otherwise (the socket only left a namespace) leaves it to the sweep,
    /// which closes it once it has been in no namespace for the linger time.
    pub async fn disconnected(
        &self,
        sid: impl fmt::Display,
        reason: DisconnectReason,
    ) -> Result<(), crate::ControlError> {
        if ends_session(reason) {
            self.close(sid).await
        } else {
            self.shared.ensure_sweeper();
            Ok(())
        }
    }

    /// Reports `sid` closed to sticky at once (no-op when not under sticky).
    /// A session still alive in some namespace is registered again by the
    /// next sweep.
    pub async fn close(&self, sid: impl fmt::Display) -> Result<(), crate::ControlError> {
        let sid = sid.to_string();
        let Some(control) = &self.shared.control else {
            return Ok(());
        };
        self.shared.sessions.lock().unwrap().remove(&sid);
        control.close(&sid).await
    }

    /// Number of sessions this process has registered and not yet closed.
    pub fn tracked(&self) -> usize {
        self.shared.sessions.lock().unwrap().len()
    }
}

impl Shared {
    /// Tracks and registers `sid`, unless already tracked.
    async fn open(&self, sid: String, seen: bool) -> Result<(), crate::ControlError> {
        let Some(control) = &self.control else {
            return Ok(());
        };
        {
            let mut sessions = self.sessions.lock().unwrap();
            if sessions.contains_key(&sid) {
                return Ok(());
            }
            sessions.insert(sid.clone(), Tracked::new(seen));
        }
        control.open(&sid).await
    }

    fn ensure_sweeper(self: &Arc<Self>) {
        if self.control.is_none() || self.live.is_none() {
            return;
        }
        if self.sweeper_started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.sweeper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Shared> = Arc::downgrade(self);
        let every = self.sweep_interval;
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                shared.sweep().await;
            }
        });
    }

    /// Closes tracked sessions that ended (seen alive before and gone now,
    /// or never seen within the grace period) and registers live sessions
    /// nobody registered (WebSocket-only ones).
    async fn sweep(&self) {
        let (Some(control), Some(live)) = (&self.control, &self.live) else {
            return;
        };
        let live = live();
        let mut to_open = Vec::new();
        let mut to_close = Vec::new();
        {
            let mut sessions = self.sessions.lock().unwrap();
            let now = Instant::now();
            sessions.retain(|sid, t| {
                if live.contains(sid) {
                    t.seen = true;
                    t.gone_since = None;
                    return true;
                }
                let ended = if t.seen {
                    now.duration_since(*t.gone_since.get_or_insert(now)) >= self.linger
                } else {
                    now.duration_since(t.since) > self.connect_grace
                };
                if ended {
                    to_close.push(sid.clone());
                }
                !ended
            });
            for sid in live {
                if !sessions.contains_key(&sid) && valid_sid(&sid) {
                    sessions.insert(sid.clone(), Tracked::new(true));
                    to_open.push(sid);
                }
            }
        }
        for sid in to_open {
            if let Err(e) = control.open(&sid).await {
                warn(format_args!("open {sid}: {e}"));
            }
        }
        for sid in to_close {
            if let Err(e) = control.close(&sid).await {
                warn(format_args!("close {sid}: {e}"));
            }
        }
    }
}

/// Whether a socket disconnected for `reason` means its Engine.IO session
/// ended. `ClientNSDisconnect` and `ServerNSDisconnect` only end the
/// namespace's socket: the Engine.IO session may carry other namespaces,
/// and the client usually closes it with one more request.
pub fn ends_session(reason: DisconnectReason) -> bool {
    !matches!(
        reason,
        DisconnectReason::ClientNSDisconnect | DisconnectReason::ServerNSDisconnect
    )
}

fn warn(message: fmt::Arguments<'_>) {
    eprintln!("sticky-socketioxide: {message}");
}

/// What a request is, as far as stickiness goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Not an Engine.IO long-polling request.
    Other,
    /// An Engine.IO long-polling request of an existing session.
    Polling,
    /// An Engine.IO long-polling handshake (GET without sid).
    Handshake,
}

fn classify(method: &Method, path: &str, query: Option<&str>, req_path: &str) -> Kind {
    if !is_req_path(path, req_path) {
        return Kind::Other;
    }
    let mut polling = false;
    let mut has_sid = false;
    for pair in query.unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "transport" => polling = value == "polling",
            "sid" => has_sid = true,
            _ => {}
        }
    }
    match (polling, has_sid, method == Method::GET) {
        (false, _, _) => Kind::Other,
        (true, false, true) => Kind::Handshake,
        (true, _, _) => Kind::Polling,
    }
}

/// Same rule as engineioxide's.
fn is_req_path(path: &str, req_path: &str) -> bool {
    path.strip_prefix(req_path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || req_path.ends_with('/'))
}

/// The sid of an Engine.IO open packet (`0{"sid":"...",...}`), the first
/// packet of a polling handshake answer (packets are separated by 0x1e).
pub fn handshake_sid(body: &[u8]) -> Option<String> {
    let json = body.strip_prefix(b"0")?;
    let first = json.split(|&b| b == 0x1e).next()?;
    let value: serde_json::Value = serde_json::from_slice(first).ok()?;
    let sid = value.get("sid")?.as_str()?;
    valid_sid(sid).then(|| sid.to_owned())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for StickyService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<StickyBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = self.shared.clone();
        let kind = classify(
            req.method(),
            req.uri().path(),
            req.uri().query(),
            &shared.req_path,
        );
        if kind == Kind::Handshake {
            shared.ensure_sweeper();
        }
        // The clone that was driven to readiness serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let future = inner.call(req);
        Box::pin(async move {
            let mut res = future.await?;
            if kind == Kind::Other {
                if shared.connection_close_all && res.status() != StatusCode::SWITCHING_PROTOCOLS {
                    res.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                return Ok(res.map(Either::Left));
            }
            if shared.connection_close {
                // The next request of this client must open a new TCP
                // connection, which sticky places by its sid: a kept-alive
                // connection would stay with this worker whatever session
                // its next request belongs to.
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            if kind != Kind::Handshake || shared.control.is_none() || res.status() != StatusCode::OK
            {
                return Ok(res.map(Either::Left));
            }
            let (parts, body) = res.into_parts();
            let bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    let e: BoxError = e.into();
                    warn(format_args!("reading a handshake answer: {e}"));
                    let mut res = Response::new(Either::Right(Full::new(Bytes::new())));
                    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    return Ok(res);
                }
            };
            match handshake_sid(&bytes) {
                Some(sid) => {
                    if let Err(e) = shared.open(sid.clone(), false).await {
                        // Answer anyway: WebSocket upgrades and a single
                        // worker still work; misrouted polls get "Session
                        // ID unknown" and the client starts over.
                        warn(format_args!("open {sid}: {e}"));
                    }
                }
                None => warn(format_args!(
                    "no sid in a handshake answer: {:?}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                )),
            }
            Ok(Response::from_parts(parts, Either::Right(Full::new(bytes))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inner service answering like engineioxide: a handshake body for
    /// polling requests without sid, `ok` otherwise.
    #[derive(Clone)]
    struct FakeEngine;

    impl Service<Request<()>> for FakeEngine {
        type Response = Response<Full<Bytes>>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<()>) -> Self::Future {
            let body = if req.uri().query().unwrap_or("").contains("sid=") {
                "ok".to_owned()
            } else {
                r#"0{"sid":"AAAAAAAAAAAAAAAA","upgrades":["websocket"]}"#.to_owned()
            };
            std::future::ready(Ok(Response::new(Full::new(Bytes::from(body)))))
        }
    }

    fn test_layer(control: Option<ControlClient>) -> StickyLayer {
        StickyLayerBuilder {
            control,
            req_path: "/socket.io".into(),
            connection_close: None,
            connection_close_all: false,
            live: None,
            connect_grace: Duration::from_secs(1),
            linger: Duration::from_secs(1),
            sweep_interval: Duration::from_secs(1),
        }
        .build()
    }

    async fn get(svc: &mut StickyService<FakeEngine>, uri: &str) -> (http::response::Parts, Bytes) {
        let res = svc.call(Request::get(uri).body(()).unwrap()).await.unwrap();
        let (parts, body) = res.into_parts();
        (parts, body.collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn registers_handshakes_before_answering() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let dir =
            std::env::temp_dir().join(format!("sticky-socketioxide-layer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Some(line) = lines.next_line().await.unwrap() {
                // Answer late: the handshake must wait for it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                tx.send(line).unwrap();
                w.write_all(b"ok\n").await.unwrap();
            }
        });

        let layer = test_layer(Some(ControlClient::new(&path)));
        let mut svc = layer.layer(FakeEngine);
        let (parts, body) = get(&mut svc, "/socket.io/?EIO=4&transport=polling").await;
        // The open was answered before the handshake answer was returned.
        assert_eq!(rx.try_recv().unwrap(), "open AAAAAAAAAAAAAAAA");
        assert_eq!(
            &body[..],
            br#"0{"sid":"AAAAAAAAAAAAAAAA","upgrades":["websocket"]}"#
        );
        assert_eq!(parts.headers[CONNECTION], "close");
        assert_eq!(layer.handle().tracked(), 1);

        // Requests of the session: Connection: close, no registration.
        let (parts, body) = get(
            &mut svc,
            "/socket.io/?EIO=4&transport=polling&sid=AAAAAAAAAAAAAAAA",
        )
        .await;
        assert_eq!(&body[..], b"ok");
        assert_eq!(parts.headers[CONNECTION], "close");
        // Anything else is untouched.
        let (parts, _) = get(&mut svc, "/other?transport=polling").await;
        assert!(parts.headers.get(CONNECTION).is_none());
        let (parts, _) = get(&mut svc, "/socket.io/?EIO=4&transport=websocket").await;
        assert!(parts.headers.get(CONNECTION).is_none());

        layer.handle().close("AAAAAAAAAAAAAAAA").await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), "close AAAAAAAAAAAAAAAA");
        assert_eq!(layer.handle().tracked(), 0);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn sweeps_ended_and_unregistered_sessions() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let dir =
            std::env::temp_dir().join(format!("sticky-socketioxide-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let lines2 = lines.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r).lines();
            while let Some(line) = r.next_line().await.unwrap() {
                lines2.lock().unwrap().push(line);
                w.write_all(b"ok\n").await.unwrap();
            }
        });
        let live = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
        let live2 = live.clone();
        let layer = StickyLayerBuilder {
            control: Some(ControlClient::new(&path)),
            req_path: "/socket.io".into(),
            connection_close: None,
            connection_close_all: false,
            live: Some(Box::new(move || live2.lock().unwrap().clone())),
            connect_grace: Duration::from_millis(1000),
            linger: Duration::from_millis(100),
            sweep_interval: Duration::from_secs(3600),
        }
        .build();
        let handle = layer.handle();
        let sweep = || layer.shared.sweep();
        let set_live = |sids: &[&str]| {
            *live.lock().unwrap() = sids.iter().map(|s| s.to_string()).collect();
        };
        let take = || std::mem::take(&mut *lines.lock().unwrap());

        handle.open("a").await.unwrap(); // joins a namespace, then leaves
        handle.open("c").await.unwrap(); // never joins one
        assert_eq!(take(), ["open a", "open c"]);
        set_live(&["a", "ws"]); // "ws": a WebSocket-only session nobody registered
        sweep().await;
        assert_eq!(take(), ["open ws"]);
        set_live(&["ws"]);
        sweep().await;
        assert_eq!(take(), Vec::<String>::new(), "a lingers");
        tokio::time::sleep(Duration::from_millis(120)).await;
        sweep().await;
        assert_eq!(take(), ["close a"]);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        sweep().await;
        assert_eq!(take(), ["close c"], "c never joined within the grace");
        // An engine-level end closes at once; a namespace-level one lingers.
        handle
            .disconnected("ws", DisconnectReason::TransportClose)
            .await
            .unwrap();
        assert_eq!(take(), ["close ws"]);
        handle.open("b").await.unwrap();
        handle
            .disconnected("b", DisconnectReason::ClientNSDisconnect)
            .await
            .unwrap();
        assert_eq!(take(), ["open b"]);
        set_live(&[]);
        assert_eq!(handle.tracked(), 1);
    }

    #[tokio::test]
    async fn connection_close_all() {
        let mut builder = StickyLayerBuilder {
            control: Some(ControlClient::new("/nonexistent/sticky.sock")),
            req_path: "/socket.io".into(),
            connection_close: None,
            connection_close_all: false,
            live: None,
            connect_grace: Duration::from_secs(1),
            linger: Duration::from_secs(1),
            sweep_interval: Duration::from_secs(1),
        };
        builder = builder.connection_close_all(true);
        let mut svc = builder.build().layer(FakeEngine);
        let (parts, _) = get(&mut svc, "/page").await;
        assert_eq!(parts.headers[CONNECTION], "close");
        // A failed registration still answers the handshake.
        let (parts, body) = get(&mut svc, "/socket.io/?EIO=4&transport=polling").await;
        assert!(body.starts_with(b"0{"));
        assert_eq!(parts.headers[CONNECTION], "close");
    }

    #[tokio::test]
    async fn passes_through_outside_sticky() {
        let layer = test_layer(None);
        let mut svc = layer.layer(FakeEngine);
        let (parts, body) = get(&mut svc, "/socket.io/?EIO=4&transport=polling").await;
        assert!(body.starts_with(b"0{"));
        assert!(parts.headers.get(CONNECTION).is_none());
        assert_eq!(layer.handle().tracked(), 0);
        layer.handle().open("abc").await.unwrap();
        layer.handle().close("abc").await.unwrap();
    }

    #[test]
    fn handshake_sids() {
        let body = br#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        assert_eq!(handshake_sid(body).as_deref(), Some("lv_VI97HAXpY6yYWAAAC"));
        // Followed by another packet.
        let mut two = body.to_vec();
        two.extend_from_slice(b"\x1e40");
        assert_eq!(handshake_sid(&two).as_deref(), Some("lv_VI97HAXpY6yYWAAAC"));
        for bad in [
            &b""[..],
            b"0",
            b"{\"sid\":\"abc\"}",
            b"1{\"sid\":\"abc\"}",
            b"0{\"sid\":1}",
            b"0{\"sid\":\"\"}",
            b"0{\"sid\":\"a b\"}",
            b"0{\"nosid\":\"abc\"}",
            b"0{\"sid\":\"abc\"",
            b"4hello",
        ] {
            assert_eq!(
                handshake_sid(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn request_kinds() {
        let p = "/socket.io";
        let get = &Method::GET;
        let post = &Method::POST;
        assert_eq!(
            classify(get, "/socket.io/", Some("EIO=4&transport=polling"), p),
            Kind::Handshake
        );
        assert_eq!(
            classify(get, "/socket.io/", Some("EIO=4&transport=polling&t=Nx1"), p),
            Kind::Handshake
        );
        assert_eq!(
            classify(get, "/socket.io", Some("transport=polling&EIO=4"), p),
            Kind::Handshake
        );
        assert_eq!(
            classify(
                get,
                "/socket.io/",
                Some("EIO=4&transport=polling&sid=abc"),
                p
            ),
            Kind::Polling
        );
        assert_eq!(
            classify(
                post,
                "/socket.io/",
                Some("EIO=4&transport=polling&sid=abc"),
                p
            ),
            Kind::Polling
        );
        assert_eq!(
            classify(get, "/socket.io/", Some("EIO=4&transport=polling&sid="), p),
            Kind::Polling
        );
        assert_eq!(
            classify(get, "/socket.io/", Some("EIO=4&transport=websocket"), p),
            Kind::Other
        );
        assert_eq!(
            classify(
                get,
                "/socket.io/",
                Some("EIO=4&transport=websocket&sid=a"),
                p
            ),
            Kind::Other
        );
        assert_eq!(
            classify(get, "/socket.iox/", Some("EIO=4&transport=polling"), p),
            Kind::Other
        );
        assert_eq!(
            classify(get, "/", Some("EIO=4&transport=polling"), p),
            Kind::Other
        );
        assert_eq!(classify(get, "/socket.io/", None, p), Kind::Other);
        assert_eq!(
            classify(get, "/app/", Some("transport=polling"), "/app/"),
            Kind::Handshake
        );
    }
}
