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

use std::fmt;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::json;
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::socket::DisconnectReason;
use socketioxide::SocketIo;
use sticky_socketioxide::StickyLayer;
use tower_http::cors::CorsLayer;

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

/// Any Socket.IO argument, binary attachments included: socketioxide's
/// parser hands attachments to `deserialize_any` visitors as byte buffers
/// and serializes byte strings as attachments, which `serde_json::Value`
/// would turn into arrays of numbers.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(String),
    Bin(Bytes),
    Seq(Vec<Value>),
    Map(Vec<(String, Value)>),
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::I64(n) => s.serialize_i64(*n),
            Value::U64(n) => s.serialize_u64(*n),
            Value::F64(n) => s.serialize_f64(*n),
            Value::Str(v) => s.serialize_str(v),
            Value::Bin(v) => s.serialize_bytes(v),
            Value::Seq(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any Socket.IO value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::I64(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::U64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::F64(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bin(Bytes::copy_from_slice(v)))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bin(Bytes::from(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            entries.push((k, v));
        }
        Ok(Value::Map(entries))
    }
}
