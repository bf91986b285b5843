//! Engine.IO v4 / Socket.IO client steps over raw HTTP and WebSocket: the
//! handshake, the namespace connect, polling, the upgrade and acked events.
//!
//! Every step checks that the answer came from the session's own worker: a
//! worker that does not own the sid answers Engine.IO's 400 "Session ID
//! unknown"; where the server names itself (`X-Worker-Pid` on Node answers,
//! the `pid` in a `whoami` ack) that is compared too.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use serde_json::Value;

use crate::eio::{self, Packet, SioPacket};
use crate::http::{self, Conn, Response};
use crate::ws::WebSocket;

/// Why a step failed.
#[derive(Debug)]
pub enum Failure {
    /// The answer came from a worker that does not own the session.
    WrongWorker,
    Error(String),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Error(match e.kind() {
            // What a read timeout looks like on a blocking socket.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("no answer within {:?}", http::IO_TIMEOUT)
            }
            _ => e.to_string(),
        })
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Failure {
        Failure::Error(e)
    }
}

/// The connections of a long-polling client: as browsers use them, a `GET`
/// poll on one while a `POST` goes out on the other; or one connection for
/// both (`single`). Each is kept alive where the server allows, and
/// reopened when it closes.
pub struct Polling {
    get: Conn,
    /// None: `POST`s share the `GET` connection.
    post: Option<Conn>,
}

impl Polling {
    pub fn new(addr: SocketAddr, source: Option<Ipv4Addr>) -> Polling {
        Polling {
            get: Conn::new(addr, source),
            post: Some(Conn::new(addr, source)),
        }
    }

    /// One connection for everything: a session opened this way reaches
    /// one worker even without stickiness, as long as the server keeps the
    /// connection alive.
    pub fn single(addr: SocketAddr, source: Option<Ipv4Addr>) -> Polling {
        Polling {
            get: Conn::new(addr, source),
            post: None,
        }
    }

    fn post_conn(&mut self) -> &mut Conn {
        self.post.as_mut().unwrap_or(&mut self.get)
    }

    pub fn opened(&self) -> u64 {
        self.get.opened + self.post.as_ref().map_or(0, |c| c.opened)
    }

    pub fn close(&mut self) {
        self.get.close();
        if let Some(c) = &mut self.post {
            c.close();
        }
    }
}

/// A Socket.IO session of the default namespace.
pub struct Session {
    pub sid: String,
    /// The process that answered the handshake, when it said
    /// (`X-Worker-Pid`).
    pub pid: Option<u32>,
    next_ack: u64,
}

fn worker_pid(r: &Response) -> Option<u32> {
    r.header("x-worker-pid")?.parse().ok()
}

impl Session {
    pub fn target(&self, transport: &str) -> String {
        format!("{}&transport={transport}&sid={}", eio::PATH, self.sid)
    }

    /// Classifies an answer to a request carrying this session's sid.
    pub fn check(&self, r: Response) -> Result<Response, Failure> {
        if eio::is_unknown_sid(r.status, &r.text()) {
            return Err(Failure::WrongWorker);
        }
        if let (Some(owner), Some(answered)) = (self.pid, worker_pid(&r)) {
            if owner != answered {
                return Err(Failure::WrongWorker);
            }
        }
        if r.status != 200 {
            return Err(Failure::Error(format!(
                "status {}: {}",
                r.status,
                r.text().trim()
            )));
        }
        Ok(r)
    }

    fn next_id(&mut self) -> u64 {
        self.next_ack += 1;
        self.next_ack
    }

    /// Handshake (`GET ...&transport=polling`, open packet) and Socket.IO
    /// connect (`POST 40` on the other connection, then a poll for the
    /// `40{"sid":...}` answer).
    pub fn open(conn: &mut Polling) -> Result<Session, Failure> {
        let target = format!("{}&transport=polling", eio::PATH);
        let r = conn
            .get
            .request(&http::request("GET", &target, b"", false))?;
        if r.status != 200 {
            return Err(format!("handshake: status {}: {}", r.status, r.text().trim()).into());
        }
        let body = r.text();
        let first = eio::split_payload(&body).next().unwrap_or_default();
        let open = eio::parse_open(first)?;
        if !open.upgrades.iter().any(|u| u == "websocket") {
            return Err(format!("handshake offers no websocket upgrade: {body}").into());
        }
        let session = Session {
            sid: open.sid,
            pid: worker_pid(&r),
            next_ack: 0,
        };
        session.post(conn, "40")?;
        for _ in 0..3 {
            for message in session.poll(conn)? {
                match eio::parse_sio(&message)? {
                    SioPacket::Connect(_) => return Ok(session),
                    SioPacket::ConnectError(e) => {
                        return Err(format!("Socket.IO connect refused: {e}").into())
                    }
                    _ => {}
                }
            }
        }
        Err("no Socket.IO connect answer in 3 polls".to_string().into())
    }

    /// Sends Engine.IO packets in one `POST`.
    pub fn post(&self, conn: &mut Polling, body: &str) -> Result<(), Failure> {
        let r = conn.post_conn().request(&http::request(
            "POST",
            &self.target("polling"),
            body.as_bytes(),
            false,
        ))?;
        let r = self.check(r)?;
        if r.body != b"ok" {
            return Err(format!("POST answered {:?}", r.text()).into());
        }
        Ok(())
    }

    /// One `GET` poll: the Socket.IO messages it carried. Answers a ping
    /// with a pong; an Engine.IO close is an error.
    pub fn poll(&self, conn: &mut Polling) -> Result<Vec<String>, Failure> {
        let r = conn
            .get
            .request(&http::request("GET", &self.target("polling"), b"", false))?;
        let r = self.check(r)?;
        let body = r.text();
        let mut messages = Vec::new();
        let mut pinged = false;
        for packet in eio::split_payload(&body) {
            match eio::parse_packet(packet)? {
                Packet::Message(m) => messages.push(m.to_string()),
                Packet::Ping(_) => pinged = true,
                Packet::Close => return Err("the server closed the session".to_string().into()),
                _ => {}
            }
        }
        if pinged {
            self.post(conn, "3")?;
        }
        Ok(messages)
    }

    /// Emits `name` with `args` over polling and polls until its ack.
    pub fn call_polling(
        &mut self,
        conn: &mut Polling,
        name: &str,
        args: &[Value],
    ) -> Result<Value, Failure> {
        let id = self.next_id();
        self.post(conn, &eio::event(id, name, args))?;
        loop {
            for message in self.poll(conn)? {
                if let SioPacket::Ack { id: got, data } = eio::parse_sio(&message)? {
                    if got == id {
                        return Ok(data);
                    }
                }
            }
        }
    }

    /// Upgrades to WebSocket on a new connection: `101`, `2probe` /
    /// `3probe`, `5`.
    pub fn upgrade(
        &self,
        addr: SocketAddr,
        source: Option<Ipv4Addr>,
    ) -> Result<WebSocket, Failure> {
        let mut conn = Conn::new(addr, source);
        let r = conn.request(&crate::ws::upgrade_request(&self.target("websocket")))?;
        if r.status != 101 {
            self.check(r)?;
            return Err("upgrade answered 200 instead of 101".to_string().into());
        }
        let (stream, rest) = conn
            .take()
            .ok_or_else(|| Failure::Error("upgrade: connection closed".into()))?;
        let mut ws = WebSocket::new(stream, rest);
        ws.send_text("2probe")?;
        let answer = ws.recv_text()?;
        if answer != "3probe" {
            return Err(format!("probe answered {answer:?}").into());
        }
        ws.send_text("5")?;
        Ok(ws)
    }

    /// A WebSocket-only session (`transport=websocket` from the start, as
    /// Socket.IO clients configured with `transports: ["websocket"]` open
    /// them): one connection, no routing after it.
    pub fn open_websocket(
        addr: SocketAddr,
        source: Option<Ipv4Addr>,
    ) -> Result<(Session, WebSocket), Failure> {
        let mut conn = Conn::new(addr, source);
        let target = format!("{}&transport=websocket", eio::PATH);
        let r = conn.request(&crate::ws::upgrade_request(&target))?;
        if r.status != 101 {
            return Err(format!(
                "WebSocket handshake: status {}: {}",
                r.status,
                r.text().trim()
            )
            .into());
        }
        let (stream, rest) = conn
            .take()
            .ok_or_else(|| Failure::Error("WebSocket handshake: connection closed".into()))?;
        let mut ws = WebSocket::new(stream, rest);
        let open = eio::parse_open(&ws.recv_text()?)?;
        let session = Session {
            sid: open.sid,
            pid: None,
            next_ack: 0,
        };
        ws.send_text("40")?;
        loop {
            let text = ws.recv_text()?;
            if let Packet::Message(m) = eio::parse_packet(&text)? {
                match eio::parse_sio(m)? {
                    SioPacket::Connect(_) => return Ok((session, ws)),
                    SioPacket::ConnectError(e) => {
                        return Err(format!("Socket.IO connect refused: {e}").into())
                    }
                    _ => {}
                }
            }
        }
    }

    /// Emits `name` with `args` over the WebSocket and waits for its ack;
    /// answers pings on the way.
    pub fn call_ws(
        &mut self,
        ws: &mut WebSocket,
        name: &str,
        args: &[Value],
    ) -> Result<Value, Failure> {
        let id = self.next_id();
        ws.send_text(&eio::event(id, name, args))?;
        loop {
            let text = ws.recv_text()?;
            match eio::parse_packet(&text)? {
                Packet::Ping(_) => ws.send_text("3")?,
                Packet::Close => return Err("the server closed the session".to_string().into()),
                Packet::Message(m) => {
                    if let SioPacket::Ack { id: got, data } = eio::parse_sio(m)? {
                        if got == id {
                            return Ok(data);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Checks a `whoami` ack against the handshake's worker.
    pub fn check_whoami(&self, data: &Value) -> Result<(), Failure> {
        let pid = eio::ack_pid(data).ok_or(format!("whoami ack without a pid: {data}"))?;
        match self.pid {
            Some(owner) if owner != pid => Err(Failure::WrongWorker),
            _ => Ok(()),
        }
    }

    /// Ends the session (Engine.IO close over a new connection); errors do
    /// not matter.
    pub fn close_polling(&self, addr: SocketAddr, source: Option<Ipv4Addr>) {
        let _ = http::exchange(
            addr,
            source,
            &http::request("POST", &self.target("polling"), b"1", true),
        );
    }
}
