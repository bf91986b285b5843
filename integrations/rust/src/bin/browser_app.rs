//! The browser test app, Rust (socketioxide + axum): an ordinary Socket.IO
//! app whose worker serves its own page, script, stylesheet and JSON API
//! (hyper's keep-alive default), driven by `e2e/test/browser.test.js`.
//! `hello` `{"worker", "pid"}` on connection; `echo` acks `{"pid", "payload"}`.
//!
//! `APP_STICKY=integration` adds this crate's [`StickyLayer`] as its README
//! says; otherwise (plain) the app has no sticky code and only listens on
//! fd 3. `APP_PAGE_DIR` holds `index.html`, `app.js`, `app.css`;
//! `APP_CLIENT_JS` is the socket.io client bundle served as `/client.js`.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::SocketIo;
use sticky_socketioxide::StickyLayer;

#[path = "shared/plain.rs"]
mod plain;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let worker = plain::worker_index();
    let pid = std::process::id();
    let me = json!({ "worker": worker, "pid": pid, "lang": "rust" });
    let integration = std::env::var("APP_STICKY").as_deref() == Ok("integration");

    let (io_layer, io) = SocketIo::new_layer();
    let hello = me.clone();
    io.ns("/", async move |socket: SocketRef| {
        socket.on(
            "echo",
            async move |Data(payload): Data<Value>, ack: AckSender| {
                ack.send(&json!({ "pid": pid, "payload": payload })).ok();
            },
        );
        socket.emit("hello", &hello).ok();
    });

    let page_dir = std::env::var("APP_PAGE_DIR").map_err(|_| missing("APP_PAGE_DIR"))?;
    let client_js = std::env::var("APP_CLIENT_JS").map_err(|_| missing("APP_CLIENT_JS"))?;
    let file = |path: String, content_type: &'static str| -> std::io::Result<_> {
        let body = std::fs::read(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))?;
        Ok(get(move || async move {
            (
                [(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-store")],
                body,
            )
        }))
    };
    let mut app = Router::new()
        .route("/", file(format!("{page_dir}/index.html"), "text/html")?)
        .route(
            "/app.js",
            file(format!("{page_dir}/app.js"), "text/javascript")?,
        )
        .route("/app.css", file(format!("{page_dir}/app.css"), "text/css")?)
        .route("/client.js", file(client_js, "text/javascript")?)
        .route(
            "/api/ping",
            get(move |headers: HeaderMap| async move {
                // What a front proxy says the client's address is.
                let forwarded_for = headers
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = json!({ "worker": worker, "pid": pid, "forwardedFor": forwarded_for })
                    .to_string();
                (
                    [
                        (CONTENT_TYPE, "application/json"),
                        (CACHE_CONTROL, "no-store"),
                    ],
                    body,
                )
            }),
        )
        .layer(io_layer);

    let listener = if integration {
        app = app.layer(StickyLayer::new(&io));
        sticky_socketioxide::listener()?
    } else {
        plain::listener().await?
    };
    axum::serve(listener, app).await
}

fn missing(var: &str) -> std::io::Error {
    std::io::Error::other(format!(
        "{var} is not set (the browser test sets it; see e2e/test/browser.test.js)"
    ))
}
