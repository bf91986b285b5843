//! Run a [socketioxide](https://docs.rs/socketioxide) (Socket.IO / Engine.IO)
//! server as several processes under `sticky run` (this repository) with
//! sticky sessions placed by the kernel.
//!
//! # Why
//!
//! An Engine.IO session that uses HTTP long-polling is a series of HTTP
//! requests, each of which may arrive on a new TCP connection, and only the
//! process that created the session knows it: sent to any other process, a
//! request gets `400 "Session ID unknown"` and the client starts over. With
//! several worker processes behind one port, every request carrying
//! `?sid=<id>` must reach the worker that owns `<id>`.
//!
//! `sticky run` does that placement in the kernel (eBPF), from the request
//! line of each new connection, but it can only route sids it has been told
//! about. This crate tells it, and keeps the rules that make the placement
//! hold:
//!
//! * **Register before the handshake answer leaves.** The client learns its
//!   sid from the handshake answer (`0{"sid":"...",...}`) and may send the
//!   next request at once; if sticky did not know the sid by then, that
//!   request would be balanced to any worker. socketioxide has no hook for
//!   session-id generation, so [`StickyLayer`] wraps the socketioxide
//!   service: for a polling handshake (`GET ...?EIO=4&transport=polling`
//!   without `sid`) it reads the answer's body, sends `open <sid>` on the
//!   control connection, waits for `ok`, then returns the answer (the same
//!   bytes, re-wrapped).
//! * **No keep-alive across polling requests.** A kept-alive connection
//!   stays with the worker that accepted it, whatever session its next
//!   request belongs to (the flaw `@socket.io/sticky` marks FIXME). Under
//!   sticky, long-polling responses therefore carry `Connection: close`, so
//!   every request opens a new connection that sticky places by its sid.
//!   WebSocket upgrades are unaffected. Also where sticky resets such a
//!   connection itself (`STICKY_FOREIGN_REQUESTS=reset`): browsers resend on
//!   a new connection, Node's socket.io-client does not complete a resent
//!   request; `.connection_close(false)` saves browser-only deployments a
//!   handshake per poll.
//! * **Report sessions that end**, so sticky forgets them and its
//!   `least-connection` balancing counts live sessions. socketioxide does
//!   not expose the end of an Engine.IO session either; in socketioxide a
//!   socket's id *is* its Engine.IO sid, so the layer sweeps (every 500 ms
//!   by default) the sockets connected to any namespace and sends `close
//!   <sid>` for registered sessions that have been in no namespace for 2 s
//!   (the linger: a client leaving its last namespace closes the Engine.IO
//!   session with one more request, which must still reach this worker),
//!   or that never joined one within socketioxide's `connect_timeout`
//!   (+5 s). [`StickyHandle::disconnected`], called from `on_disconnect`,
//!   reports an end at once when the disconnect reason says the Engine.IO
//!   session itself ended (transport closed, heartbeat timeout, ...).
//! * **WebSocket-only sessions** (`transport=websocket` without sid, as with
//!   `transports: ["websocket"]`) send their handshake in the first
//!   WebSocket frame, which the layer does not see. They need no
//!   stickiness: a WebSocket is one TCP connection for its whole life. The
//!   sweep registers them anyway (for balancing counts), or call
//!   [`StickyHandle::open`] from the connect handler to do it at once.
//!
//! Outside sticky (`$STICKY_CONTROL` unset) the layer does nothing and
//! [`listener`] binds `127.0.0.1:$PORT`, so the same binary runs alone.
//!
//! # Adopting it
//!
//! Two lines in an axum + socketioxide app:
//!
//! ```no_run
//! use axum::Router;
//! use socketioxide::{extract::SocketRef, SocketIo};
//!
//! # async fn run() -> std::io::Result<()> {
//! let (io_layer, io) = SocketIo::new_layer();
//! io.ns("/", async |socket: SocketRef| { /* handlers */ });
//! let app = Router::new()
//!     .layer(io_layer)
//!     .layer(sticky_socketioxide::StickyLayer::new(&io)); // outside socketioxide's layer
//! let listener = sticky_socketioxide::listener()?; // fd 3 under sticky, else $PORT
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! [`StickyLayer`] must wrap the socketioxide layer (be added after it with
//! axum's `Router::layer`, before it in a `tower::ServiceBuilder`).
//!
//! # Socket activation
//!
//! `sticky run` gives each worker its own listening socket as fd 3 with
//! `LISTEN_FDS=1` and `LISTEN_PID=<pid>` (the systemd convention), plus
//! `STICKY_WORKER=<index>` and `STICKY_CONTROL=<control socket path>`.
//! [`listener`] uses fd 3 when `LISTEN_FDS` is set and `LISTEN_PID` is this
//! process.

mod control;
mod layer;
mod relay;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{FromRawFd, RawFd};

pub use control::{valid_sid, ControlClient, ControlError, CONTROL_ENV};
pub use layer::{
    ends_session, handshake_sid, StickyBody, StickyHandle, StickyLayer, StickyLayerBuilder,
    StickyService,
};
pub use relay::RelayDriver;

/// First inherited descriptor in the socket-activation convention.
pub const LISTEN_FDS_START: RawFd = 3;

/// Default port when not socket-activated and `$PORT` is unset.
pub const DEFAULT_PORT: u16 = 3000;

/// fd 3 when this process was socket-activated (`LISTEN_FDS` >= 1 and
/// `LISTEN_PID` is this process's pid), else `None`.
pub fn activated_fd() -> Option<RawFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.trim().parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.trim().parse().ok()?;
    (pid == std::process::id() && fds >= 1).then_some(LISTEN_FDS_START)
}

/// `$STICKY_WORKER`, this worker's 0-based index under sticky.
pub fn worker_index() -> Option<u32> {
    std::env::var("STICKY_WORKER").ok()?.trim().parse().ok()
}

/// The listener to serve on: the inherited socket (fd 3) when
/// socket-activated, else a new one on `127.0.0.1:$PORT` (default 3000).
///
/// Must be called inside a Tokio runtime.
pub fn listener() -> io::Result<tokio::net::TcpListener> {
    let std_listener = match activated_fd() {
        Some(fd) => {
            // The inherited descriptor is not close-on-exec: keep it out of
            // any process this worker starts.
            // SAFETY: fcntl on a descriptor number has no memory effects.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
            // SAFETY: socket activation hands this process ownership of fd 3.
            let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            listener.local_addr().map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("LISTEN_FDS: fd {fd} is not a TCP socket: {e}"),
                )
            })?;
            listener
        }
        None => {
            let port = match std::env::var("PORT") {
                Ok(p) if !p.trim().is_empty() => p.trim().parse().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("PORT={p:?}: not a port"),
                    )
                })?,
                _ => DEFAULT_PORT,
            };
            std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?
        }
    };
    std_listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std_listener)
}
