//! The 503 listener: the selector sends connections here when no worker is
//! alive. The supervisor reads the request (so closing does not reset the
//! connection before the client sees the answer), answers 503 and closes.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

const RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain\r\n\
Content-Length: 20\r\n\
Retry-After: 1\r\n\
Connection: close\r\n\
\r\n\
no worker available\n";

/// Concurrent 503 answers; beyond this, connections are closed unanswered.
const MAX_IN_FLIGHT: usize = 256;

pub fn serve(listener: TcpListener) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("reject".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
                let counter = in_flight.clone();
                let spawned = std::thread::Builder::new()
                    .name("reject-conn".into())
                    .spawn(move || {
                        answer(stream);
                        counter.fetch_sub(1, Ordering::Relaxed);
                    });
                if spawned.is_err() {
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                }
            }
        })
        .expect("spawning the 503 thread");
}

fn answer(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    // Read the request head, up to 64 KiB: closing with unread data would
    // send a reset that can destroy the answer in flight.
    let mut buf = [0u8; 4096];
    let mut head = Vec::new();
    while head.len() < 65536 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.write_all(RESPONSE);
    let _ = stream.shutdown(Shutdown::Write);
    // Drain whatever else the client sends until it closes.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}
