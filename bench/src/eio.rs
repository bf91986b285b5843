//! Engine.IO v4 and Socket.IO v5 packets, as the load generator sends and
//! reads them (text only: no binary attachments).
//!
//! Engine.IO: one digit of packet type then data; `0` open (JSON with the
//! sid), `1` close, `2` ping, `3` pong, `4` message, `5` upgrade, `6` noop.
//! An HTTP long-polling body holds several packets separated by `\x1e`.
//! Socket.IO rides in Engine.IO messages: a type digit (`0` connect, `1`
//! disconnect, `2` event, `3` ack, `4` connect error), an optional `/nsp,`,
//! an optional ack id, then JSON.

use serde_json::Value;

/// The path of every Engine.IO request here (the default `/socket.io/`).
pub const PATH: &str = "/socket.io/?EIO=4";

/// What the open packet tells a client.
#[derive(Debug, PartialEq)]
pub struct Open {
    pub sid: String,
    pub upgrades: Vec<String>,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
}

#[derive(Debug, PartialEq)]
pub enum Packet<'a> {
    Open(&'a str),
    Close,
    Ping(&'a str),
    Pong(&'a str),
    Message(&'a str),
    Upgrade,
    Noop,
}

pub fn parse_packet(text: &str) -> Result<Packet<'_>, String> {
    let mut chars = text.chars();
    let kind = chars.next().ok_or("empty Engine.IO packet")?;
    let data = chars.as_str();
    Ok(match kind {
        '0' => Packet::Open(data),
        '1' => Packet::Close,
        '2' => Packet::Ping(data),
        '3' => Packet::Pong(data),
        '4' => Packet::Message(data),
        '5' => Packet::Upgrade,
        '6' => Packet::Noop,
        // `b` prefixes a base64 binary message; nothing here sends binary.
        other => {
            return Err(format!(
                "unknown Engine.IO packet type {other:?} in {text:?}"
            ))
        }
    })
}

/// The packets of a long-polling body.
pub fn split_payload(body: &str) -> impl Iterator<Item = &str> {
    body.split('\x1e')
}

/// Parses an open packet (`0{"sid":...}`), whole.
pub fn parse_open(packet: &str) -> Result<Open, String> {
    let Packet::Open(json) = parse_packet(packet)? else {
        return Err(format!("expected an open packet, got {packet:?}"));
    };
    let value: Value =
        serde_json::from_str(json).map_err(|e| format!("open packet {json:?}: {e}"))?;
    let sid = value["sid"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("open packet without a sid: {json}"))?;
    let number = |key: &str| {
        value[key]
            .as_u64()
            .ok_or_else(|| format!("open packet without {key}: {json}"))
    };
    let upgrades = value["upgrades"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(Open {
        sid: sid.to_string(),
        upgrades,
        ping_interval_ms: number("pingInterval")?,
        ping_timeout_ms: number("pingTimeout")?,
    })
}

/// A Socket.IO packet of the default namespace.
#[derive(Debug, PartialEq)]
pub enum SioPacket {
    /// `0{"sid":...}`: the namespace accepted the connection.
    Connect(Value),
    Disconnect,
    Event {
        id: Option<u64>,
        data: Value,
    },
    Ack {
        id: u64,
        data: Value,
    },
    ConnectError(Value),
}

/// Parses the data of an Engine.IO message as a Socket.IO packet.
pub fn parse_sio(message: &str) -> Result<SioPacket, String> {
    let bad = |why: &str| format!("Socket.IO packet {message:?}: {why}");
    let mut rest = message;
    let kind = rest.chars().next().ok_or_else(|| bad("empty"))?;
    rest = &rest[1..];
    if rest.starts_with('/') {
        let (nsp, after) = rest.split_once(',').unwrap_or((rest, ""));
        if nsp != "/" {
            return Err(bad("not the default namespace"));
        }
        rest = after;
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = match digits {
        0 => None,
        _ => Some(rest[..digits].parse::<u64>().map_err(|_| bad("ack id"))?),
    };
    rest = &rest[digits..];
    let data = || -> Result<Value, String> {
        if rest.is_empty() {
            Ok(Value::Null)
        } else {
            serde_json::from_str(rest).map_err(|e| bad(&e.to_string()))
        }
    };
    Ok(match kind {
        '0' => SioPacket::Connect(data()?),
        '1' => SioPacket::Disconnect,
        '2' => SioPacket::Event { id, data: data()? },
        '3' => SioPacket::Ack {
            id: id.ok_or_else(|| bad("ack without an id"))?,
            data: data()?,
        },
        '4' => SioPacket::ConnectError(data()?),
        // 5 and 6 are binary events and acks.
        _ => return Err(bad("unsupported packet type")),
    })
}

/// An Engine.IO message carrying a Socket.IO event `[name, args...]` that
/// asks for an ack with `id`.
pub fn event(id: u64, name: &str, args: &[Value]) -> String {
    let mut array = vec![Value::from(name)];
    array.extend_from_slice(args);
    format!("42{id}{}", Value::Array(array))
}

/// The `pid` a worker put in a `whoami` ack (`[{"pid": N, ...}]`).
pub fn ack_pid(data: &Value) -> Option<u32> {
    data.get(0)?.get("pid")?.as_u64()?.try_into().ok()
}

/// Engine.IO's answer to a request carrying a sid its process does not
/// know: how a request routed to the wrong worker shows, whatever the
/// server (engine.io: `{"code":1,"message":"Session ID unknown"}`;
/// socketioxide: `Session ID unknown` as well, plain text).
pub fn is_unknown_sid(status: u16, body: &str) -> bool {
    status == 400 && body.contains("Session ID unknown")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn open_packet() {
        let open = parse_open(
            r#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#,
        )
        .unwrap();
        assert_eq!(
            open,
            Open {
                sid: "lv_VI97HAXpY6yYWAAAC".into(),
                upgrades: vec!["websocket".into()],
                ping_interval_ms: 25000,
                ping_timeout_ms: 20000,
            }
        );
    }

    #[test]
    fn bad_open_packets() {
        for bad in [
            "",
            "0",
            "0{}",
            r#"0{"sid":""}"#,
            r#"0{"sid":"x"}"#, // no ping settings
            r#"4{"sid":"x","pingInterval":1,"pingTimeout":1}"#,
            "0{\"sid\":",
            "x",
        ] {
            assert!(parse_open(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn polling_payload_with_several_packets() {
        let body = "2\x1e40{\"sid\":\"abc\"}\x1e6";
        let packets: Vec<_> = split_payload(body)
            .map(|p| parse_packet(p).unwrap())
            .collect();
        assert_eq!(
            packets,
            [
                Packet::Ping(""),
                Packet::Message(r#"0{"sid":"abc"}"#),
                Packet::Noop
            ]
        );
        assert_eq!(parse_packet("3probe").unwrap(), Packet::Pong("probe"));
        assert_eq!(parse_packet("5").unwrap(), Packet::Upgrade);
        assert_eq!(parse_packet("1").unwrap(), Packet::Close);
        assert!(parse_packet("9").is_err());
        assert!(parse_packet("").is_err());
    }

    #[test]
    fn socket_io_packets() {
        assert_eq!(
            parse_sio(r#"0{"sid":"abc"}"#).unwrap(),
            SioPacket::Connect(json!({"sid": "abc"}))
        );
        assert_eq!(
            parse_sio(r#"317[{"pid":42}]"#).unwrap(),
            SioPacket::Ack {
                id: 17,
                data: json!([{"pid": 42}])
            }
        );
        assert_eq!(ack_pid(&json!([{"pid": 42, "worker": 1}])), Some(42));
        assert_eq!(ack_pid(&json!(["x"])), None);
        assert_eq!(
            parse_sio(r#"2["hello",{"a":1}]"#).unwrap(),
            SioPacket::Event {
                id: None,
                data: json!(["hello", {"a": 1}])
            }
        );
        assert_eq!(
            parse_sio(r#"4{"message":"no"}"#).unwrap(),
            SioPacket::ConnectError(json!({"message": "no"}))
        );
        assert_eq!(parse_sio("1").unwrap(), SioPacket::Disconnect);
        assert_eq!(
            parse_sio("3/,5[1]").unwrap(),
            SioPacket::Ack {
                id: 5,
                data: json!([1])
            }
        );
        assert!(parse_sio("/admin,0").is_err());
        assert!(parse_sio("3[1]").is_err()); // an ack needs an id
        assert!(parse_sio("2[").is_err());
    }

    #[test]
    fn event_encoding_round_trips() {
        let text = event(7, "echo", &[json!("x")]);
        assert_eq!(text, r#"427["echo","x"]"#);
        let Packet::Message(sio) = parse_packet(&text).unwrap() else {
            panic!("not a message")
        };
        assert_eq!(
            parse_sio(sio).unwrap(),
            SioPacket::Event {
                id: Some(7),
                data: json!(["echo", "x"])
            }
        );
    }

    #[test]
    fn unknown_sid_answers() {
        assert!(is_unknown_sid(
            400,
            r#"{"code":1,"message":"Session ID unknown"}"#
        ));
        assert!(!is_unknown_sid(
            400,
            r#"{"code":3,"message":"Bad request"}"#
        ));
        assert!(!is_unknown_sid(200, "ok"));
    }
}
