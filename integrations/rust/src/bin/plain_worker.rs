//! A socketioxide worker with no sticky code at all: it takes the listening
//! socket sticky hands over (fd 3, socket activation) and serves Socket.IO
//! on it, nothing more. No registration, no `Connection: close`: with
//! `sticky run --learn on` (the default) the kernel learns its sessions from
//! the handshake answers. It uses only socketioxide, axum, tokio and
//! tower-http (and `shared/plain.rs`, std and tokio only), not this crate's
//! library. The e2e suite drives it (`e2e/test/learning.test.js`); the
//! benchmark uses it for WebSocket round trips.
//!
//! Same events as the other e2e workers: `hello` `{"worker", "pid", "lang":
//! "rust"}` on connection, `echo` (acks its JSON payload), `whoami` (acks
//! the identity); `GET /whoami` answers the identity too.

use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::SocketIo;
use tower_http::cors::CorsLayer;

#[path = "shared/plain.rs"]
mod plain;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let worker = plain::worker_index();
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

    axum::serve(plain::listener().await?, app).await
}
