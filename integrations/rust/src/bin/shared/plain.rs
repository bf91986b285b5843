//! What the test apps share where they have no sticky code (the plain
//! worker, the browser app without the integration): their worker index and
//! their listener, by the conventions sticky follows, with std and tokio
//! only.

use std::os::fd::FromRawFd;

/// This worker's index (`STICKY_WORKER`), 0 outside sticky.
pub fn worker_index() -> u32 {
    std::env::var("STICKY_WORKER")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0)
}

/// fd 3 under socket activation (systemd's convention, which sticky
/// follows), else `127.0.0.1:$PORT`.
pub async fn listener() -> std::io::Result<tokio::net::TcpListener> {
    let activated = std::env::var("LISTEN_FDS").as_deref() == Ok("1")
        && std::env::var("LISTEN_PID").as_deref() == Ok(&std::process::id().to_string());
    if activated {
        // SAFETY: LISTEN_FDS/LISTEN_PID say fd 3 is a listening socket
        // handed to this process, and nothing else in it owns fd 3.
        let std_listener = unsafe { std::net::TcpListener::from_raw_fd(3) };
        std_listener.set_nonblocking(true)?;
        return tokio::net::TcpListener::from_std(std_listener);
    }
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await
}
