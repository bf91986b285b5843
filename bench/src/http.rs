//! A minimal HTTP/1.1 client over blocking TCP: what the load generator
//! needs and no more (Content-Length and chunked bodies, keep-alive,
//! `Connection: close`, an optional source address per client).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One parsed response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the last byte of the response arrived.
    pub complete: Instant,
    /// The server will close the connection after this response.
    pub close: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Parses one response at the start of `buf`: `Ok(None)` while incomplete,
/// else the response and how many bytes it took. A `101 Switching
/// Protocols` ends with its head (what follows belongs to the new protocol).
pub fn parse_response(buf: &[u8]) -> io::Result<Option<(Response, usize)>> {
    let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_len - 4])
        .map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("bad status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let close = version == "HTTP/1.0"
        || find("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
    let chunked = find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let (body, used) = if status == 101 || status == 204 || status == 304 {
        (Vec::new(), head_len)
    } else if chunked {
        match parse_chunked(&buf[head_len..])? {
            Some((body, n)) => (body, head_len + n),
            None => return Ok(None),
        }
    } else {
        let length: usize = match find("content-length") {
            Some(v) => v.parse().map_err(|_| invalid("bad Content-Length"))?,
            // No length: the body runs to the end of the connection, which
            // none of the servers measured here does.
            None => return Err(invalid("response without Content-Length or chunking")),
        };
        if buf.len() < head_len + length {
            return Ok(None);
        }
        (buf[head_len..head_len + length].to_vec(), head_len + length)
    };
    let response = Response {
        status,
        headers,
        body,
        complete: Instant::now(),
        close,
    };
    Ok(Some((response, used)))
}

/// Decodes a chunked body at the start of `buf`: `Ok(None)` while
/// incomplete, else the body and the bytes used (trailers included).
fn parse_chunked(buf: &[u8]) -> io::Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[at..at + eol]).map_err(|_| invalid("bad chunk"))?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
        at += eol + 2;
        if size == 0 {
            // Trailers (none expected), then an empty line.
            loop {
                let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

/// Reads from `stream` into `buf` until one whole response is there;
/// leaves in `buf` whatever followed it.
pub fn read_response(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Response> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some((response, used)) = parse_response(buf)? {
            buf.drain(..used);
            return Ok(response);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if buf.is_empty() {
                    "connection closed before a response"
                } else {
                    "connection closed in the middle of a response"
                },
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects to `addr`, from `source` if given (each load-generator client
/// its own address, as real users have: nginx's `ip_hash` would send a
/// single client address to a single worker).
pub fn connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let stream = match (source, addr) {
        (Some(source), SocketAddr::V4(_)) => connect_from(addr, source)?,
        _ => TcpStream::connect_timeout(&addr, IO_TIMEOUT)?,
    };
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn connect_from(addr: SocketAddr, source: Ipv4Addr) -> io::Result<TcpStream> {
    let SocketAddr::V4(dest) = addr else {
        unreachable!("checked by the caller")
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: plain socket syscalls on a descriptor this function owns (the
    // TcpStream takes it over at once, so it is closed on every path).
    unsafe {
        let fd = check(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let int = size_of::<libc::c_int>() as libc::socklen_t;
        // The port is chosen at connect(), per destination: binding an
        // address alone must not use up the port range.
        check(libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            int,
        ))?;
        // A full accept queue drops SYNs: give up after 2 retries (~3 s)
        // rather than the default two minutes.
        let syn_retries: libc::c_int = 2;
        check(libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&syn_retries as *const libc::c_int).cast(),
            int,
        ))?;
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let from = sockaddr(source, 0);
        check(libc::bind(
            fd,
            (&from as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        let to = sockaddr(*dest.ip(), dest.port());
        check(libc::connect(
            fd,
            (&to as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        Ok(stream)
    }
}

/// A client connection that is reopened when the server closed it (or
/// announced it would), counting the connections it opened.
pub struct Conn {
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    pub opened: u64,
}

impl Conn {
    pub fn new(addr: SocketAddr, source: Option<Ipv4Addr>) -> Conn {
        Conn {
            addr,
            source,
            stream: None,
            buf: Vec::with_capacity(4096),
            opened: 0,
        }
    }

    /// Sends `request` (on the open connection, or a new one) and reads its
    /// response. On any error the connection is dropped.
    pub fn request(&mut self, request: &[u8]) -> io::Result<Response> {
        let result = self.try_request(request);
        match &result {
            Ok(r) if !r.close => {}
            _ => self.close(),
        }
        result
    }

    fn try_request(&mut self, request: &[u8]) -> io::Result<Response> {
        if self.stream.is_none() {
            self.stream = Some(connect(self.addr, self.source)?);
            self.opened += 1;
            self.buf.clear();
        }
        let stream = self.stream.as_mut().expect("opened above");
        stream.write_all(request)?;
        read_response(stream, &mut self.buf)
    }

    pub fn close(&mut self) {
        self.stream = None;
        self.buf.clear();
    }

    /// Hands the open connection over (e.g. to a WebSocket), with any bytes
    /// already read past the last response.
    pub fn take(&mut self) -> Option<(TcpStream, Vec<u8>)> {
        let stream = self.stream.take()?;
        Some((stream, std::mem::take(&mut self.buf)))
    }
}

/// One request on a new connection (`request` should say `Connection:
/// close`), read to the end of the response; then waits for the server's
/// FIN so that the server, not this client, keeps the TIME_WAIT state (the
/// client would otherwise run out of ports at high rates).
pub fn exchange(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    request: &[u8],
) -> io::Result<Response> {
    exchange_after(addr, source, request, Duration::ZERO)
}

/// `exchange`, waiting `delay` between connect and the request, as a
/// client that far away would (its first byte arrives a round trip after
/// the handshake).
pub fn exchange_after(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    request: &[u8],
    delay: Duration,
) -> io::Result<Response> {
    let mut stream = connect(addr, source)?;
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    stream.write_all(request)?;
    let mut buf = Vec::with_capacity(512);
    let response = read_response(&mut stream, &mut buf)?;
    let mut chunk = [0u8; 1024];
    while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
    Ok(response)
}

/// A request with the headers every one of ours carries.
pub fn request(method: &str, target: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: bench\r\n");
    if close {
        out += "Connection: close\r\n";
    }
    if method == "POST" {
        out += &format!(
            "Content-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    out += "\r\n";
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_body_and_what_follows() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Worker-Pid: 42\r\n\r\nokHTTP/1.1";
        let (r, used) = parse_response(raw).unwrap().unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), used),
            (200, &b"ok"[..], raw.len() - 8)
        );
        assert_eq!(r.header("x-worker-pid"), Some("42"));
        assert!(!r.close);
    }

    #[test]
    fn incomplete_until_the_last_byte() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        for end in 0..raw.len() {
            assert!(parse_response(&raw[..end]).unwrap().is_none(), "{end}");
        }
        assert!(parse_response(raw).unwrap().is_some());
    }

    #[test]
    fn chunked_body() {
        let raw = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n";
        let (r, used) = parse_response(raw).unwrap().unwrap();
        assert_eq!(r.text(), "hello, world");
        assert_eq!(used, raw.len());
        assert!(r.close);
        assert!(parse_response(&raw[..raw.len() - 1]).unwrap().is_none());
    }

    #[test]
    fn switching_protocols_ends_at_its_head() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x01x";
        let (r, used) = parse_response(raw).unwrap().unwrap();
        assert_eq!((r.status, used), (101, raw.len() - 3));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    }
}
