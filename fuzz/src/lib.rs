//! A reference model of the kernel's request-line parser (`parse.h`),
//! written for clarity rather than for the verifier, so the two can be
//! compared: the libFuzzer harness (`parse_target.c`, `cargo xtask fuzz`)
//! calls [`sticky_reference_parse`] on every input it runs through the C
//! parser built for the host, and `sticky-ebpf`'s parser test runs the
//! committed corpus through the loaded kernel program against [`parse`].
//!
//! The grammar, as README "Placement rules" states it: the first
//! `SCAN_MAX` bytes of the first data segment must start with
//! `METHOD SP` (METHOD: 1..15 bytes `A-Z`); in the target's query string
//! (after the first `?`, before `SP`, `#`, CR, LF or NUL) the first
//! parameter named exactly `param` carries the sid: 1..64 bytes of
//! `[A-Za-z0-9_-]`, followed by `&` or one of those terminators within view.

use sticky_common::{SCAN_MAX, SID_MAX};

/// What the parser makes of a first segment (`enum sticky_parse_result`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    /// A well-formed sid: routed to its owner if it has one.
    Sid(Vec<u8>),
    /// An HTTP request line (or the start of one) without a sid.
    NoSid,
    /// The sid parameter is there but its value is malformed.
    Invalid,
    /// Not an HTTP request line.
    NotHttp,
}

impl Parse {
    /// The `enum sticky_parse_result` value.
    pub fn code(&self) -> i32 {
        match self {
            Parse::Sid(_) => 0,
            Parse::NoSid => 1,
            Parse::Invalid => 2,
            Parse::NotHttp => 3,
        }
    }
}

/// Ends the target, or the line. NUL too: the kernel copy is followed by
/// zero bytes, so the end of the data reads as NUL.
fn ends_target(b: u8) -> bool {
    matches!(b, 0 | b' ' | b'#' | b'\r' | b'\n')
}

fn sid_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Parses the first data segment `segment` for the query parameter `param`
/// (without its `=`).
pub fn parse(segment: &[u8], param: &[u8]) -> Parse {
    let data = &segment[..segment.len().min(SCAN_MAX)];
    let at = |i: usize| data.get(i).copied().unwrap_or(0);
    if data.is_empty() {
        return Parse::NotHttp;
    }
    let method = data
        .iter()
        .take(16)
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    if method == 0 || method == 16 || at(method) != b' ' {
        // Only a prefix of a method so far: the line is not finished.
        return if method < data.len() {
            Parse::NotHttp
        } else {
            Parse::NoSid
        };
    }
    let target = method + 1;
    let Some(question) = (target..=data.len()).find(|&i| at(i) == b'?' || ends_target(at(i)))
    else {
        return Parse::NoSid;
    };
    if at(question) != b'?' {
        return Parse::NoSid;
    }
    let query = question + 1;
    let mut name = param.to_vec();
    name.push(b'=');
    let mut p = query;
    let value = loop {
        let starts_parameter = p == query || at(p - 1) == b'&';
        if starts_parameter && data.get(p..p + name.len()) == Some(&name[..]) {
            break p + name.len();
        }
        if ends_target(at(p)) {
            return Parse::NoSid;
        }
        p += 1;
    };
    let len = (value..=data.len())
        .take_while(|&i| sid_byte(at(i)))
        .count();
    let end = value + len;
    if len > SID_MAX || end >= data.len() || !(at(end) == b'&' || ends_target(at(end))) {
        return Parse::Invalid;
    }
    if len == 0 {
        Parse::NoSid
    } else {
        Parse::Sid(data[value..end].to_vec())
    }
}

/// Parameter names the fuzzer tries; an input's first byte picks one
/// (`input[0] % len`), the rest is the segment. NUL-terminated for C.
pub const PARAMS: [&str; 5] = ["sid\0", "session_id\0", "abcdefghijklmno\0", "x\0", "s-d\0"];

/// Splits a fuzz input into (parameter name, first segment).
pub fn split_input(input: &[u8]) -> Option<(&'static str, &[u8])> {
    let (&selector, segment) = input.split_first()?;
    let name = PARAMS[selector as usize % PARAMS.len()];
    Some((name.trim_end_matches('\0'), segment))
}

/// C entry point: the parameter name (NUL-terminated) an input's first
/// byte selects.
#[no_mangle]
pub extern "C" fn sticky_fuzz_param(selector: u8) -> *const u8 {
    PARAMS[selector as usize % PARAMS.len()].as_ptr()
}

/// C entry point for the libFuzzer harness: parses `len` bytes at
/// `segment` for the parameter `param` (`param_len` bytes, no `=`), writes
/// the zero-padded sid (the kernel's `sessions` key) to `sid` (64 bytes) and
/// returns the `enum sticky_parse_result` value.
///
/// # Safety
/// `segment`, `param` and `sid` must be valid for the given lengths.
#[no_mangle]
pub unsafe extern "C" fn sticky_reference_parse(
    segment: *const u8,
    len: usize,
    param: *const u8,
    param_len: usize,
    sid: *mut u8,
) -> i32 {
    // SAFETY: the caller guarantees the lengths.
    let (segment, param, sid) = unsafe {
        (
            std::slice::from_raw_parts(segment, len),
            std::slice::from_raw_parts(param, param_len),
            std::slice::from_raw_parts_mut(sid, SID_MAX),
        )
    };
    let result = parse(segment, param);
    sid.fill(0);
    if let Parse::Sid(bytes) = &result {
        sid[..bytes.len()].copy_from_slice(bytes);
    }
    result.code()
}

#[cfg(test)]
mod tests {
    use super::{parse, Parse::*};

    #[test]
    fn the_grammar() {
        let sid = |s: &str| Sid(s.as_bytes().to_vec());
        for (input, want) in [
            ("GET /?sid=abc HTTP/1.1\r\n", sid("abc")),
            ("GET /?a=1&sid=abc&b HTTP/1.1", sid("abc")),
            ("GET /?sid=abc#x ", sid("abc")),
            ("GET /?sid=a&sid=b ", sid("a")),
            ("GET /?sid=&sid=b ", NoSid),
            ("GET /?xsid=abc ", NoSid),
            ("GET /?SID=abc ", NoSid),
            ("GET /sid=abc?x ", NoSid),
            ("GET /x#?sid=abc ", NoSid),
            ("GET /?sid=abc", Invalid),
            ("GET /?sid=a.c ", Invalid),
            ("GET /?sid=a%2D ", Invalid),
            ("GET", NoSid),
            ("GETPOSTPUTDELETEPATCH /", NotHttp),
            ("get /?sid=abc ", NotHttp),
            ("", NotHttp),
        ] {
            assert_eq!(parse(input.as_bytes(), b"sid"), want, "{input:?}");
        }
        let long = format!("GET /?sid={} ", "a".repeat(65));
        assert_eq!(parse(long.as_bytes(), b"sid"), Invalid);
        let edge = format!("GET /?sid={} ", "a".repeat(64));
        assert_eq!(parse(edge.as_bytes(), b"sid"), sid(&"a".repeat(64)));
        let beyond = format!("GET /{}?sid=abc ", "p".repeat(1100));
        assert_eq!(parse(beyond.as_bytes(), b"sid"), NoSid);
    }
}
