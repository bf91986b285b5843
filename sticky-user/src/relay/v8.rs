//! Just enough of V8's serialization format (what Node's `advanced` IPC
//! serialization writes, `v8.serialize`) to route a message of
//! `@socket.io/cluster-adapter`: the top-level object's `source`, `uid`,
//! `nsp`, `type` and `requesterUid`. Every other value is skipped, never
//! decoded; the relay forwards the frame's bytes as they came. The one
//! message the relay writes itself is `adapter_close`.
//!
//! Format: `0xFF <version>` then one value; tags as in V8's
//! `value-serializer.cc`. Node's IPC serializer writes a Buffer (or any
//! ArrayBufferView) as a host object: `\\`, varint 0, varint view type,
//! varint byte length, the bytes.

use std::fmt;

/// The routing fields of a cluster-adapter message.
#[derive(Debug, Default, PartialEq)]
pub struct AdapterMessage {
    pub uid: Option<String>,
    pub nsp: Option<String>,
    pub requester_uid: Option<String>,
    pub msg_type: Option<i64>,
}

#[derive(Debug, PartialEq)]
pub struct Malformed(&'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

const ADAPTER_SOURCE: &str = "_sio_adapter";
/// Nesting deeper than this is refused rather than recursed into.
const MAX_DEPTH: usize = 64;

/// `Ok(None)`: a well-formed message that is not the adapter's (no
/// `source: "_sio_adapter"`); the primary of `setupPrimary()` ignores those.
pub fn adapter_message(bytes: &[u8]) -> Result<Option<AdapterMessage>, Malformed> {
    let mut r = Reader { bytes, pos: 0 };
    if r.byte()? != 0xFF {
        return Err(Malformed("no serialization header"));
    }
    r.varint()?; // format version
    r.skip_padding();
    if r.byte()? != b'o' {
        return Ok(None); // not an object: not the adapter's
    }
    let mut msg = AdapterMessage::default();
    let mut source_ok = false;
    loop {
        r.skip_padding();
        if r.peek()? == b'{' {
            break;
        }
        let key = r.key()?;
        r.skip_padding();
        match key.as_deref() {
            Some("source") => source_ok = r.string_value()?.as_deref() == Some(ADAPTER_SOURCE),
            Some("uid") => msg.uid = r.string_value()?,
            Some("nsp") => msg.nsp = r.string_value()?,
            Some("requesterUid") => msg.requester_uid = r.string_value()?,
            Some("type") => msg.msg_type = r.number_value()?,
            _ => r.skip_value(0)?,
        }
    }
    Ok(source_ok.then_some(msg))
}

/// socket.io-adapter's `MessageType.ADAPTER_CLOSE`.
const ADAPTER_CLOSE: u32 = 13;

/// What an adapter sends when it closes, on behalf of one that died: the
/// others then stop waiting for its answers at once, instead of after their
/// heartbeat timeout. The V8 serialization of `{ uid, nsp, type: 13,
/// source: "_sio_adapter" }`, without the IPC length prefix.
pub fn adapter_close(uid: &str, nsp: &str) -> Vec<u8> {
    let mut out = vec![0xFF, 0x0F, b'o'];
    let string = |out: &mut Vec<u8>, s: &str| {
        out.push(b'S'); // UTF-8 string
        varint(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    };
    for (key, value) in [("uid", uid), ("nsp", nsp), ("source", ADAPTER_SOURCE)] {
        string(&mut out, key);
        string(&mut out, value);
    }
    string(&mut out, "type");
    out.push(b'I');
    varint(&mut out, u64::from(ADAPTER_CLOSE) << 1); // zigzag
    out.push(b'{');
    varint(&mut out, 4);
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, Malformed> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn peek(&self) -> Result<u8, Malformed> {
        self.bytes
            .get(self.pos)
            .copied()
            .ok_or(Malformed("truncated"))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], Malformed> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(Malformed("length overflow"))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(Malformed("truncated"))?;
        self.pos = end;
        Ok(slice)
    }

    fn varint(&mut self) -> Result<u64, Malformed> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Malformed("varint too long"))
    }

    fn len(&mut self) -> Result<usize, Malformed> {
        usize::try_from(self.varint()?).map_err(|_| Malformed("length overflow"))
    }

    fn skip_padding(&mut self) {
        while self.bytes.get(self.pos) == Some(&0) {
            self.pos += 1;
        }
    }

    /// An object key: a string, or a number (array index) given as None.
    fn key(&mut self) -> Result<Option<String>, Malformed> {
        match self.peek()? {
            b'"' | b'S' | b'c' => self.string_value(),
            _ => {
                self.skip_value(0)?;
                Ok(None)
            }
        }
    }

    /// A string value; None (skipped) if the value is of another kind.
    fn string_value(&mut self) -> Result<Option<String>, Malformed> {
        match self.peek()? {
            b'"' => {
                self.pos += 1;
                let n = self.len()?;
                // One-byte strings are Latin-1.
                Ok(Some(self.take(n)?.iter().map(|&b| char::from(b)).collect()))
            }
            b'S' => {
                self.pos += 1;
                let n = self.len()?;
                Ok(Some(String::from_utf8_lossy(self.take(n)?).into_owned()))
            }
            b'c' => {
                self.pos += 1;
                let n = self.len()?;
                let units: Vec<u16> = self
                    .take(n)?
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Ok(Some(String::from_utf16_lossy(&units)))
            }
            _ => {
                self.skip_value(0)?;
                Ok(None)
            }
        }
    }

    /// An integral number value; None (skipped) for anything else.
    fn number_value(&mut self) -> Result<Option<i64>, Malformed> {
        match self.peek()? {
            b'I' => {
                self.pos += 1;
                let z = self.varint()?;
                Ok(Some(((z >> 1) as i64) ^ -((z & 1) as i64)))
            }
            b'U' => {
                self.pos += 1;
                Ok(Some(self.varint()? as i64))
            }
            b'N' => {
                self.pos += 1;
                let d = f64::from_le_bytes(self.take(8)?.try_into().unwrap());
                Ok((d.fract() == 0.0 && d.abs() < 1e15).then_some(d as i64))
            }
            _ => {
                self.skip_value(0)?;
                Ok(None)
            }
        }
    }

    /// Skips values (keys and values alike) up to and including `end`.
    fn skip_values_until(&mut self, end: u8, depth: usize) -> Result<(), Malformed> {
        loop {
            self.skip_padding();
            if self.peek()? == end {
                self.pos += 1;
                return Ok(());
            }
            self.skip_value(depth)?;
        }
    }

    fn skip_value(&mut self, depth: usize) -> Result<(), Malformed> {
        if depth > MAX_DEPTH {
            return Err(Malformed("nested too deeply"));
        }
        let depth = depth + 1;
        self.skip_padding();
        match self.byte()? {
            b'_' | b'0' | b'T' | b'F' | b'y' | b'x' | b'-' => {}
            b'I' | b'U' | b'^' | b'u' | b't' => {
                self.varint()?;
            }
            b'N' | b'D' | b'n' => {
                self.take(8)?;
            }
            b'Z' | b'z' => {
                let bitfield = self.len()?;
                self.take(bitfield / 2)?;
            }
            b'"' | b'S' | b'c' | b'B' => {
                let n = self.len()?;
                self.take(n)?;
            }
            b's' => self.skip_value(depth)?,
            b'R' => {
                self.skip_value(depth)?;
                self.varint()?;
            }
            b'o' => {
                self.skip_values_until(b'{', depth)?;
                self.varint()?;
            }
            b'A' => {
                self.varint()?;
                self.skip_values_until(b'$', depth)?;
                self.varint()?;
                self.varint()?;
            }
            b'a' => {
                self.varint()?;
                self.skip_values_until(b'@', depth)?;
                self.varint()?;
                self.varint()?;
            }
            b';' => {
                self.skip_values_until(b':', depth)?;
                self.varint()?;
            }
            b'\'' => {
                self.skip_values_until(b',', depth)?;
                self.varint()?;
            }
            b'~' => {
                let n = self.len()?;
                self.varint()?; // max byte length
                self.take(n)?;
            }
            b'V' => {
                self.byte()?; // view subtag
                self.varint()?; // offset
                self.varint()?; // length
                self.varint()?; // flags (format version >= 14)
            }
            b'\\' => {
                // Node's IPC host object: 0 (an ArrayBufferView, e.g. a
                // Buffer), view type, byte length, the bytes.
                if self.varint()? != 0 {
                    return Err(Malformed("unsupported host object"));
                }
                self.varint()?;
                let n = self.len()?;
                self.take(n)?;
            }
            b'r' => self.skip_error(depth)?,
            _ => return Err(Malformed("unsupported value tag")),
        }
        // An ArrayBuffer may be followed by the view made of it.
        if self.bytes.get(self.pos) == Some(&b'V') {
            self.skip_value(depth)?;
        }
        Ok(())
    }

    /// An Error object: tagged fields until `.`.
    fn skip_error(&mut self, depth: usize) -> Result<(), Malformed> {
        loop {
            match self.byte()? {
                b'.' => return Ok(()),
                b'E' | b'R' | b'F' | b'S' | b'T' | b'U' => {}
                b'm' | b's' => self.skip_value(depth)?,
                b'c' => self.skip_value(depth)?,
                _ => return Err(Malformed("unsupported error field")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Node 20's IPC serializer writes for `{uid:'abc', nsp:'/', type:3,
    /// data:{packet:{type:2, data:['x', Buffer.from([1,2,3]), 1.5, -7, null,
    /// true, [1,2], new Map([[1,2]])]}}, source:'_sio_adapter',
    /// requesterUid:'é'}` (`v8.serialize`, plus the IPC host object's 0).
    const SAMPLE: &str = "ff0f6f2203756964220361626322036e737022012f22047479706549062204646174616f22067061636b65746f220474797065490422046461746141082201785c000a030102034e000000000000f83f490d30544102490249042400023b490249043a022400087b027b012206736f75726365220c5f73696f5f61646170746572220c7265717565737465725569642201e97b06";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn reads_the_routing_fields_past_nested_data() {
        let msg = adapter_message(&hex(SAMPLE)).unwrap().unwrap();
        assert_eq!(msg.uid.as_deref(), Some("abc"));
        assert_eq!(msg.msg_type, Some(3));
        assert_eq!(msg.requester_uid.as_deref(), Some("é"));
    }

    #[test]
    fn other_messages_are_not_the_adapters() {
        // v8.serialize({cmd: 'x'}) and v8.serialize('hello')
        assert_eq!(
            adapter_message(&hex("ff0f6f2203636d642201787b01")),
            Ok(None)
        );
        assert_eq!(adapter_message(&hex("ff0f220568656c6c6f")), Ok(None));
    }

    #[test]
    fn adapter_close_reads_back() {
        let bytes = adapter_close("u1", "/chat");
        let msg = adapter_message(&bytes).unwrap().unwrap();
        assert_eq!(msg.uid.as_deref(), Some("u1"));
        assert_eq!(msg.nsp.as_deref(), Some("/chat"));
        assert_eq!(msg.msg_type, Some(13));
    }

    #[test]
    fn truncated_input_is_refused() {
        let bytes = hex(SAMPLE);
        for n in 0..bytes.len() - 1 {
            assert!(adapter_message(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
    }
}
