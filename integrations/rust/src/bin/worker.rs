//! A Socket.IO worker for `sticky run`, built on socketioxide and axum, used
//! by the end-to-end tests (driven by the real socket.io-client).
//!
//! * listens on fd 3 when socket-activated, else on `127.0.0.1:$PORT`;
//! * Socket.IO at `/socket.io/`, CORS open to any origin, payloads up to
//!   10 MB;
//! * on connection emits `hello` `{"worker", "pid", "lang": "rust"}`;
//! * `echo` (with ack) acks its payload unchanged, binary included;
//! * `whoami` (with ack) acks `{"worker", "pid", "lang"}`;
//! * `GET /` answers `worker=N pid=P lang=rust`.
//!
//! Sessions are registered with sticky by [`StickyLayer`] (polling
//! handshakes) and from the connect handler (WebSocket-only sessions), and
//! reported closed when their Engine.IO session ends.

use axum::routing::get;
use axum::Router;
use serde_json::json;
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::socket::DisconnectReason;
use socketioxide::SocketIo;
use sticky_socketioxide::StickyLayer;
use tower_http::cors::CorsLayer;

#[path = "shared/value.rs"]
mod value;
use value::Value;

/// Largest accepted payload (HTTP long-polling body, WebSocket message,
/// binary attachments).
const MAX_PAYLOAD: usize = 10_000_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let worker = sticky_socketioxide::worker_index().unwrap_or(0);
    let pid = std::process::id();
    let identity = json!({ "worker": worker, "pid": pid, "lang": "rust" });

    let (io_layer, io) = SocketIo::builder()
        .max_payload(MAX_PAYLOAD as u64)
        .max_buffer_size(4096)
        .ws_max_message_size(MAX_PAYLOAD)
        .with_parser(socketioxide::ParserConfig::common().max_incoming_binary_buf_size(MAX_PAYLOAD))
        .build_layer();
    let sticky = StickyLayer::new(&io);

    let handle = sticky.handle();
    io.ns("/", async move |socket: SocketRef| {
        let h = handle.clone();
        socket.on_disconnect(async move |socket: SocketRef, reason: DisconnectReason| {
            if let Err(e) = h.disconnected(socket.id, reason).await {
                eprintln!("sticky-socketioxide-worker: close {}: {e}", socket.id);
            }
        });
        socket.on(
            "echo",
            async |Data(payload): Data<Value>, ack: AckSender| {
                ack.send(&payload).ok();
            },
        );
        let me = identity.clone();
        socket.on("whoami", async move |ack: AckSender| {
            ack.send(&me).ok();
        });
        socket.emit("hello", &identity).ok();

        // Polling sessions were registered by the layer before their
        // handshake answer left (this is then a no-op); WebSocket-only ones
        // are registered here, for least-connection counts.
        if let Err(e) = handle.open(socket.id).await {
            eprintln!("sticky-socketioxide-worker: open {}: {e}", socket.id);
        }
    });

    let banner = format!("worker={worker} pid={pid} lang=rust\n");
    let app = Router::new()
        .route("/", get(move || async move { banner }))
        .layer(io_layer)
        .layer(CorsLayer::very_permissive())
        // Outermost, so CORS preflights get `Connection: close` too.
        .layer(sticky);

    let listener = sticky_socketioxide::listener()?;
    eprintln!(
        "sticky-socketioxide-worker {worker} (pid {pid}) listening on {}",
        listener.local_addr()?
    );
    axum::serve(listener, app).await
}
