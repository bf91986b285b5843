//! A socketioxide worker of the broadcast tests (e2e/test/cluster.test.js):
//! the events of e2e/workers/cluster-app.js that socketioxide offers across
//! servers (hello, join, shout, shout-room, count through `fetch_sockets`;
//! it has no server-side emit).
//!
//! `ADAPTER=relay` (default): socketioxide-redis's adapter over
//! [`RelayDriver`] (sticky's relay socket); `ADAPTER=redis`: the same adapter
//! over its own Redis driver, on `$REDIS_URL`.

use axum::Router;
use serde_json::json;
use socketioxide::adapter::Emitter;
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::socket::DisconnectReason;
use socketioxide::SocketIo;
use socketioxide_redis::drivers::Driver;
use socketioxide_redis::{CustomRedisAdapter, RedisAdapter, RedisAdapterConfig, RedisAdapterCtr};
use sticky_socketioxide::{RelayDriver, StickyLayer};
use tower_http::cors::CorsLayer;

#[path = "shared/value.rs"]
mod value;
use value::Value;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = RedisAdapterConfig::default();
    if std::env::var("ADAPTER").as_deref() == Ok("redis") {
        let url = std::env::var("REDIS_URL").map_err(|_| "ADAPTER=redis needs REDIS_URL")?;
        let client = redis::Client::open(url)?;
        let ctr = RedisAdapterCtr::new_with_redis_config(&client, config).await?;
        let (layer, io) = SocketIo::builder()
            .with_adapter::<RedisAdapter<_>>(ctr)
            .build_layer();
        serve(layer, io).await
    } else {
        let ctr = RedisAdapterCtr::new_with_driver(RelayDriver::connect_env().await?, config);
        let (layer, io) = SocketIo::builder()
            .with_adapter::<CustomRedisAdapter<_, RelayDriver>>(ctr)
            .build_layer();
        serve(layer, io).await
    }
}

/// socketioxide-redis's adapter over driver `R`.
type Over<R> = CustomRedisAdapter<Emitter, R>;

async fn serve<R: Driver>(
    io_layer: socketioxide::layer::SocketIoLayer<Over<R>>,
    io: SocketIo<Over<R>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let worker = sticky_socketioxide::worker_index().unwrap_or(0);
    let me = json!({ "worker": worker, "pid": std::process::id() });
    let sticky = StickyLayer::new(&io);
    let handle = sticky.handle();
    let io2 = io.clone();
    io.ns("/", async move |socket: SocketRef<Over<R>>| {
        let h = handle.clone();
        socket.on_disconnect(
            async move |socket: SocketRef<Over<R>>, reason: DisconnectReason| {
                let _ = h.disconnected(socket.id, reason).await;
            },
        );
        let (m, io) = (me.clone(), io2.clone());
        socket.on(
            "join",
            async move |socket: SocketRef<Over<R>>,
                        Data(room): Data<String>,
                        ack: AckSender<Over<R>>| {
                socket.join(room);
                ack.send(&m).ok();
            },
        );
        let m = me.clone();
        let i = io.clone();
        socket.on(
            "shout",
            async move |Data(payload): Data<Value>, ack: AckSender<Over<R>>| {
                if let Err(e) = i.emit("shout", &payload).await {
                    eprintln!("cluster worker: emit: {e}");
                }
                ack.send(&m).ok();
            },
        );
        let m = me.clone();
        let i = io.clone();
        socket.on(
            "shout-room",
            async move |Data((room, payload)): Data<(String, Value)>, ack: AckSender<Over<R>>| {
                if let Err(e) = i.to(room).emit("shout-room", &payload).await {
                    eprintln!("cluster worker: emit to room: {e}");
                }
                ack.send(&m).ok();
            },
        );
        let i = io.clone();
        socket.on("count", async move |ack: AckSender<Over<R>>| {
            let answer = match i.fetch_sockets().await {
                Ok(sockets) => json!({ "count": sockets.len() }),
                Err(e) => json!({ "error": e.to_string() }),
            };
            ack.send(&answer).ok();
        });
        socket.emit("hello", &me).ok();
        let _ = handle.open(socket.id).await;
    })
    .await
    .map_err(|e| format!("cluster adapter: {e}"))?;

    let app = Router::new()
        .layer(io_layer)
        .layer(CorsLayer::very_permissive())
        .layer(sticky);
    let listener = sticky_socketioxide::listener()?;
    axum::serve(listener, app).await?;
    Ok(())
}
