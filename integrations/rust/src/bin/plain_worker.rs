//! A socketioxide worker with no sticky code at all: it takes the listening
//! socket sticky hands over (fd 3, socket activation) and serves Socket.IO
//! on it, nothing more. No registration, no `Connection: close`: with
//! `sticky run --learn on` (the default) the kernel learns its sessions from
//! the handshake answers. It uses only socketioxide, axum, tokio and
//! tower-http, not this crate's library. The e2e suite drives it
//! (`e2e/test/learning.test.js`); the benchmark uses it for WebSocket round
//! trips.
//!
//! Same events as the other e2e workers: `hello` `{"worker", "pid", "lang":
//! "rust"}` on connection, `echo` (acks its JSON payload), `whoami` (acks
//! the identity); `GET /whoami` answers the identity too.

use std::os::fd::FromRawFd;

use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::SocketIo;
use tower_http::cors::CorsLayer;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let worker: u32 = std::env::var("STICKY_WORKER")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    let identity = json!({ "worker": worker, "pid": std::process::id(), "lang": "rust" });

    let (io_layer, io) = SocketIo::new_layer();
    let me = identity.clone();
    io.ns("/", async move |socket: SocketRef| {
        socket.on(
            "echo",
            async |Data(payload): Data<Value>, ack: AckSender| {
                ack.send(&payload).ok();
            },
        );
        let whoami = me.clone();
        socket.on("whoami", async move |ack: AckSender| {
            ack.send(&whoami).ok();
        });
        socket.emit("hello", &me).ok();
    });

    let banner = identity.to_string();
    let app = Router::new()
        .route("/whoami", get(move || async move { banner }))
        .layer(io_layer)
        .layer(CorsLayer::very_permissive());

    // Socket activation (systemd's convention, which sticky follows).
    let activated = std::env::var("LISTEN_FDS").as_deref() == Ok("1")
        && std::env::var("LISTEN_PID").as_deref() == Ok(&std::process::id().to_string());
    let listener = if activated {
        // SAFETY: LISTEN_FDS/LISTEN_PID say fd 3 is a listening socket
        // handed to this process, and nothing else in it owns fd 3.
        let std_listener = unsafe { std::net::TcpListener::from_raw_fd(3) };
        std_listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std_listener)?
    } else {
        let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
        tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?
    };
    axum::serve(listener, app).await
}
