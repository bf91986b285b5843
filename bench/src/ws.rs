//! WebSocket (RFC 6455) client framing: enough for Engine.IO text packets.
//! Client frames are masked; server frames are not (masked ones are
//! accepted anyway).

use std::io::{self, Read, Write};
use std::net::TcpStream;

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A fixed key: the server's `Sec-WebSocket-Accept` is not checked (the
/// `101` and the Engine.IO probe exchange that follows are).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The upgrade request for `target`.
pub fn upgrade_request(target: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
    .into_bytes()
}

/// One final frame from client to server.
pub fn encode(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[derive(Debug, PartialEq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Parses one frame at the start of `buf`: `Ok(None)` while incomplete,
/// else the frame and its length.
pub fn parse_frame(buf: &[u8]) -> io::Result<Option<(Frame, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (fin, opcode) = (buf[0] & 0x80 != 0, buf[0] & 0x0F);
    if buf[0] & 0x70 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "WebSocket frame with reserved bits (no extension was negotiated)",
        ));
    }
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        at += 4;
        Some([buf[at - 4], buf[at - 3], buf[at - 2], buf[at - 1]])
    } else {
        None
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(mask) = mask {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= mask[i % 4]);
    }
    Ok(Some((
        Frame {
            fin,
            opcode,
            payload,
        },
        at + len,
    )))
}

/// An open WebSocket carrying Engine.IO text packets.
pub struct WebSocket {
    stream: TcpStream,
    buf: Vec<u8>,
    mask: u32,
}

impl WebSocket {
    /// Takes over `stream` after its `101`, with bytes already read past it.
    pub fn new(stream: TcpStream, buf: Vec<u8>) -> WebSocket {
        WebSocket {
            stream,
            buf,
            mask: 0x9E37_79B9,
        }
    }

    pub fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        // Masks need not be secret here, only present.
        self.mask = self.mask.rotate_left(7) ^ 0x5bd1_e995;
        self.stream
            .write_all(&encode(opcode, payload, self.mask.to_be_bytes()))
    }

    pub fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(OP_TEXT, text.as_bytes())
    }

    /// The next text message; answers WebSocket pings on the way.
    pub fn recv_text(&mut self) -> io::Result<String> {
        let mut message = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            while let Some((frame, used)) = parse_frame(&self.buf)? {
                self.buf.drain(..used);
                match frame.opcode {
                    OP_PING => self.send(OP_PONG, &frame.payload)?,
                    OP_PONG => {}
                    OP_CLOSE => {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "the server closed the WebSocket",
                        ))
                    }
                    // Text, or its continuation frames.
                    _ => {
                        message.extend_from_slice(&frame.payload);
                        if frame.fin {
                            return String::from_utf8(message).map_err(|_| {
                                io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 text frame")
                            });
                        }
                    }
                }
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the WebSocket connection was closed",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a close frame and drops the connection.
    pub fn close(mut self) {
        let _ = self.send(OP_CLOSE, &1000u16.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame: unmasked.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut masked = encode(opcode, payload, [0; 4]);
        // An all-zero mask leaves the payload as is: drop the mask bit and
        // the key to make it an unmasked frame.
        masked[1] &= 0x7F;
        let header = match payload.len() {
            n if n < 126 => 2,
            n if n <= 0xFFFF => 4,
            _ => 10,
        };
        masked.drain(header..header + 4);
        masked
    }

    #[test]
    fn round_trip_every_length_form() {
        for len in [0, 1, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let frame = encode(OP_TEXT, &payload, [1, 2, 3, 4]);
            let (parsed, used) = parse_frame(&frame).unwrap().unwrap();
            assert_eq!(used, frame.len());
            assert_eq!(parsed.payload, payload, "{len}");
            assert!(parsed.fin);
            let server = server_frame(OP_TEXT, &payload);
            let (parsed, used) = parse_frame(&server).unwrap().unwrap();
            assert_eq!((parsed.payload, used), (payload, server.len()));
            for end in 0..server.len().min(300) {
                assert!(parse_frame(&server[..end]).unwrap().is_none());
            }
        }
    }

    #[test]
    fn client_frames_are_masked() {
        let frame = encode(OP_TEXT, b"2probe", [0xAA, 0xBB, 0xCC, 0xDD]);
        assert_eq!(frame[0], 0x81);
        assert_eq!(frame[1], 0x80 | 6);
        assert_eq!(&frame[2..6], &[0xAA, 0xBB, 0xCC, 0xDD]);
        assert_ne!(&frame[6..], b"2probe");
    }

    #[test]
    fn reserved_bits_are_refused() {
        assert!(parse_frame(&[0xC1, 0x00]).is_err());
    }
}
