//! SPDY/3.1 framing, only what Kubernetes' remotecommand and portforward
//! protocols use (no maintained crate exists; see docs/streaming.md).
//!
//! Frames (draft-mbelshe-httpbis-spdy-00, SPDY/3 section 2.2):
//! control frames start with the control bit, version 3 and a type; data
//! frames with a 31-bit stream id; both then carry 8 bits of flags and a
//! 24-bit length. Header blocks are zlib streams primed with the SPDY/3
//! dictionary, one compression context per direction for the connection's
//! life, each block ended with a sync flush.
//!
//! Everything read comes from a client: every length is checked, nothing
//! here panics on input, and a decompressed header block is bounded.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;
/// Largest frame payload accepted (the remotecommand streams send small
/// frames; 24 bits would allow 16 MiB).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest decompressed header block accepted.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
const MAX_HEADERS: u32 = 256;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes used here.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_REFUSED_STREAM: u32 = 3;
pub const RST_CANCEL: u32 = 5;

/// Errors of the framing layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpdyError {
    #[error("SPDY frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("SPDY version {0} is not 3")]
    Version(u16),
    #[error("malformed SPDY {0} frame")]
    Malformed(&'static str),
    #[error("bad SPDY header block: {0}")]
    Headers(String),
}

/// Header pairs (names lower case).
pub type Headers = Vec<(String, String)>;

/// A frame, its header blocks still compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        flags: u8,
        data: Vec<u8>,
    },
    SynStream {
        stream_id: u32,
        associated: u32,
        priority: u8,
        flags: u8,
        block: Vec<u8>,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        block: Vec<u8>,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<(u8, u32, u32)>,
    },
    Ping(u32),
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        block: Vec<u8>,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A control frame of a type we do not use (ignored, as the spec asks).
    Unknown(u16),
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

impl Frame {
    /// Parses one frame from the front of `buf`: `Ok(None)` until the whole
    /// frame is there, else the frame and the bytes it took.
    pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, SpdyError> {
        let Some(head) = buf.get(..8) else {
            return Ok(None);
        };
        let len = usize::from(head[5]) << 16 | usize::from(head[6]) << 8 | usize::from(head[7]);
        if len > MAX_FRAME {
            return Err(SpdyError::TooLarge(len));
        }
        let Some(body) = buf.get(8..8 + len) else {
            return Ok(None);
        };
        let flags = head[4];
        let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let frame = if word & 0x8000_0000 == 0 {
            Frame::Data {
                stream_id: word,
                flags,
                data: body.to_vec(),
            }
        } else {
            let version = ((word >> 16) & 0x7fff) as u16;
            if version != VERSION {
                return Err(SpdyError::Version(version));
            }
            Self::control((word & 0xffff) as u16, flags, body)?
        };
        Ok(Some((frame, 8 + len)))
    }

    fn control(kind: u16, flags: u8, body: &[u8]) -> Result<Frame, SpdyError> {
        let id = |what| {
            be32(body)
                .map(|v| v & 0x7fff_ffff)
                .ok_or(SpdyError::Malformed(what))
        };
        let second =
            |what| be32(body.get(4..).unwrap_or_default()).ok_or(SpdyError::Malformed(what));
        Ok(match kind {
            SYN_STREAM => {
                if body.len() < 10 {
                    return Err(SpdyError::Malformed("SYN_STREAM"));
                }
                Frame::SynStream {
                    stream_id: id("SYN_STREAM")?,
                    associated: second("SYN_STREAM")? & 0x7fff_ffff,
                    priority: body[8] >> 5,
                    flags,
                    block: body[10..].to_vec(),
                }
            }
            SYN_REPLY => Frame::SynReply {
                stream_id: id("SYN_REPLY")?,
                flags,
                block: body.get(4..).unwrap_or_default().to_vec(),
            },
            HEADERS => Frame::Headers {
                stream_id: id("HEADERS")?,
                flags,
                block: body.get(4..).unwrap_or_default().to_vec(),
            },
            RST_STREAM => {
                if body.len() != 8 {
                    return Err(SpdyError::Malformed("RST_STREAM"));
                }
                Frame::RstStream {
                    stream_id: id("RST_STREAM")?,
                    status: second("RST_STREAM")?,
                }
            }
            SETTINGS => {
                let n = be32(body).ok_or(SpdyError::Malformed("SETTINGS"))? as usize;
                if body.len() != 4 + n.saturating_mul(8) {
                    return Err(SpdyError::Malformed("SETTINGS"));
                }
                let entries = body[4..]
                    .chunks_exact(8)
                    .map(|e| {
                        (
                            e[0],
                            u32::from_be_bytes([0, e[1], e[2], e[3]]),
                            u32::from_be_bytes([e[4], e[5], e[6], e[7]]),
                        )
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            PING => {
                if body.len() != 4 {
                    return Err(SpdyError::Malformed("PING"));
                }
                Frame::Ping(id("PING").map(|_| be32(body).unwrap_or(0))?)
            }
            GOAWAY => {
                if body.len() != 8 {
                    return Err(SpdyError::Malformed("GOAWAY"));
                }
                Frame::GoAway {
                    last_good: id("GOAWAY")?,
                    status: second("GOAWAY")?,
                }
            }
            WINDOW_UPDATE => {
                if body.len() != 8 {
                    return Err(SpdyError::Malformed("WINDOW_UPDATE"));
                }
                Frame::WindowUpdate {
                    stream_id: id("WINDOW_UPDATE")?,
                    delta: second("WINDOW_UPDATE")? & 0x7fff_ffff,
                }
            }
            other => Frame::Unknown(other),
        })
    }

    /// The frame on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (head, flags, body): (u32, u8, Vec<u8>) = match self {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => (stream_id & 0x7fff_ffff, *flags, data.clone()),
            Frame::SynStream {
                stream_id,
                associated,
                priority,
                flags,
                block,
            } => {
                let mut b = Vec::with_capacity(10 + block.len());
                b.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                b.extend_from_slice(&(associated & 0x7fff_ffff).to_be_bytes());
                b.push((priority & 7) << 5);
                b.push(0);
                b.extend_from_slice(block);
                (control(SYN_STREAM), *flags, b)
            }
            Frame::SynReply {
                stream_id,
                flags,
                block,
            } => (control(SYN_REPLY), *flags, with_id(*stream_id, block)),
            Frame::Headers {
                stream_id,
                flags,
                block,
            } => (control(HEADERS), *flags, with_id(*stream_id, block)),
            Frame::RstStream { stream_id, status } => (
                control(RST_STREAM),
                0,
                with_id(*stream_id, &status.to_be_bytes()),
            ),
            Frame::Settings { flags, entries } => {
                let mut b = (entries.len() as u32).to_be_bytes().to_vec();
                for (f, id, value) in entries {
                    b.push(*f);
                    b.extend_from_slice(&id.to_be_bytes()[1..]);
                    b.extend_from_slice(&value.to_be_bytes());
                }
                (control(SETTINGS), *flags, b)
            }
            Frame::Ping(id) => (control(PING), 0, id.to_be_bytes().to_vec()),
            Frame::GoAway { last_good, status } => (
                control(GOAWAY),
                0,
                with_id(*last_good, &status.to_be_bytes()),
            ),
            Frame::WindowUpdate { stream_id, delta } => (
                control(WINDOW_UPDATE),
                0,
                with_id(*stream_id, &(delta & 0x7fff_ffff).to_be_bytes()),
            ),
            Frame::Unknown(kind) => (control(*kind), 0, Vec::new()),
        };
        let len = body.len().min(0xff_ffff) as u32;
        let mut out = Vec::with_capacity(8 + body.len());
        out.extend_from_slice(&head.to_be_bytes());
        out.push(flags);
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&body[..len as usize]);
        out
    }
}

fn control(kind: u16) -> u32 {
    0x8000_0000 | u32::from(VERSION) << 16 | u32::from(kind)
}

fn with_id(id: u32, rest: &[u8]) -> Vec<u8> {
    let mut b = (id & 0x7fff_ffff).to_be_bytes().to_vec();
    b.extend_from_slice(rest);
    b
}

/// The SPDY/3 header compression dictionary (SPDY/3 section 2.6.10.1):
/// length-prefixed header names and values, then common value fragments.
pub fn dictionary() -> &'static [u8] {
    static DICT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412\
            413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
            Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal \
            Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul \
            Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,\
            text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,\
            text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8\
            charset=iso-8859-1,utf-,*,enq=0.";
        let mut d = Vec::with_capacity(1423);
        for w in WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(TAIL.as_bytes());
        d
    })
}

/// One direction's header compression context.
pub struct HeaderEncoder {
    z: Compress,
}

impl Default for HeaderEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderEncoder {
    pub fn new() -> Self {
        let mut z = Compress::new(Compression::default(), true);
        // A fresh stream accepts a dictionary; the error case cannot occur.
        let _ = z.set_dictionary(dictionary());
        Self { z }
    }

    /// The compressed block of `headers` (names lower-cased).
    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Result<Vec<u8>, SpdyError> {
        let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
        for (name, value) in headers {
            for s in [name.to_ascii_lowercase().as_str(), value] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            out.reserve(256);
            let before = self.z.total_in();
            self.z
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Headers(e.to_string()))?;
            let used = (self.z.total_in() - before) as usize;
            input = &input[used..];
            // Done when all input is in and the flush left spare room.
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// The other direction's context.
pub struct HeaderDecoder {
    z: Decompress,
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecoder {
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    /// The header pairs of one compressed block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        let mut raw = Vec::with_capacity(block.len() * 4);
        let mut input = block;
        loop {
            if raw.len() >= MAX_HEADER_BLOCK {
                return Err(SpdyError::Headers("header block too large".into()));
            }
            raw.reserve(1024.min(MAX_HEADER_BLOCK - raw.len()).max(1));
            let before_in = self.z.total_in();
            let before_out = self.z.total_out();
            let result = self
                .z
                .decompress_vec(input, &mut raw, FlushDecompress::Sync);
            let status = match result {
                Ok(s) => s,
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(dictionary())
                        .map_err(|e| SpdyError::Headers(e.to_string()))?;
                    Status::Ok
                }
                Err(e) => return Err(SpdyError::Headers(e.to_string())),
            };
            let used = (self.z.total_in() - before_in) as usize;
            input = &input[used..];
            let produced = self.z.total_out() - before_out;
            if status == Status::StreamEnd {
                break;
            }
            if input.is_empty() && raw.len() < raw.capacity() {
                break;
            }
            if used == 0 && produced == 0 && input.is_empty() {
                break;
            }
        }
        parse_block(&raw)
    }
}

fn parse_block(raw: &[u8]) -> Result<Headers, SpdyError> {
    let bad = |what: &str| SpdyError::Headers(what.to_owned());
    let n = be32(raw).ok_or_else(|| bad("no header count"))?;
    if n > MAX_HEADERS {
        return Err(bad("too many headers"));
    }
    let mut at = 4usize;
    let mut next = || -> Result<String, SpdyError> {
        let len = be32(raw.get(at..).unwrap_or_default()).ok_or_else(|| bad("truncated"))? as usize;
        at += 4;
        let s = raw
            .get(at..at.saturating_add(len))
            .ok_or_else(|| bad("truncated"))?;
        at += len;
        String::from_utf8(s.to_vec()).map_err(|_| bad("not UTF-8"))
    };
    let mut headers = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let name = next()?.to_ascii_lowercase();
        let value = next()?;
        headers.push((name, value));
    }
    Ok(headers)
}

/// The value of `name` in `headers`.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spdy3_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b",*,enq=0."));
        assert!(d.windows(10).any(|w| w == b"\0\0\0\x06origin"));
    }

    #[test]
    fn control_frames_match_the_spec_layout() {
        // RST_STREAM of stream 5, CANCEL: 80 03 00 03 | 00 00 00 08 | id | code.
        let f = Frame::RstStream {
            stream_id: 5,
            status: RST_CANCEL,
        };
        let wire = f.encode();
        assert_eq!(wire, [0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 5, 0, 0, 0, 5]);
        assert_eq!(Frame::parse(&wire).unwrap(), Some((f, 16)));
        // PING 7.
        assert_eq!(
            Frame::Ping(7).encode(),
            [0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 7]
        );
        // A data frame with FIN.
        let d = Frame::Data {
            stream_id: 3,
            flags: FLAG_FIN,
            data: b"hi".to_vec(),
        };
        assert_eq!(d.encode(), [0, 0, 0, 3, 1, 0, 0, 2, b'h', b'i']);
        // SYN_STREAM: ids, priority in the top 3 bits, slot 0.
        let s = Frame::SynStream {
            stream_id: 1,
            associated: 0,
            priority: 7,
            flags: 0,
            block: vec![9, 9],
        };
        let wire = s.encode();
        assert_eq!(&wire[..8], [0x80, 3, 0, 1, 0, 0, 0, 12]);
        assert_eq!(&wire[8..18], [0, 0, 0, 1, 0, 0, 0, 0, 0xe0, 0]);
        assert_eq!(Frame::parse(&wire).unwrap(), Some((s, 20)));
        for f in [
            Frame::Settings {
                flags: 0,
                entries: vec![(0, 7, 65536), (1, 4, 100)],
            },
            Frame::GoAway {
                last_good: 9,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 1000,
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                block: vec![1, 2, 3],
            },
            Frame::Headers {
                stream_id: 1,
                flags: FLAG_FIN,
                block: vec![],
            },
        ] {
            let wire = f.encode();
            assert_eq!(Frame::parse(&wire).unwrap(), Some((f, wire.len())));
        }
    }

    #[test]
    fn partial_bad_and_hostile_frames_are_handled() {
        let wire = Frame::Ping(1).encode();
        for n in 0..wire.len() {
            assert_eq!(Frame::parse(&wire[..n]).unwrap(), None);
        }
        // Version 2.
        assert_eq!(
            Frame::parse(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]),
            Err(SpdyError::Version(2))
        );
        // Too long.
        assert!(matches!(
            Frame::parse(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff]),
            Err(SpdyError::TooLarge(_))
        ));
        // Lengths that lie about their content.
        assert!(Frame::parse(&[0x80, 3, 0, 3, 0, 0, 0, 4, 0, 0, 0, 1]).is_err());
        assert!(Frame::parse(&[0x80, 3, 0, 1, 0, 0, 0, 4, 0, 0, 0, 1]).is_err());
        assert!(Frame::parse(&[0x80, 3, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Frame::parse(&[0x80, 3, 0, 2, 0, 0, 0, 0]).is_err());
        assert_eq!(
            Frame::parse(&[0x80, 3, 0, 0x42, 0, 0, 0, 0]).unwrap(),
            Some((Frame::Unknown(0x42), 8))
        );
        // Every prefix and every byte flip of a valid stream: no panic.
        let mut enc = HeaderEncoder::new();
        let block = enc.encode(&[("streamtype", "stdout")]).unwrap();
        let wire = Frame::SynStream {
            stream_id: 1,
            associated: 0,
            priority: 0,
            flags: 0,
            block,
        }
        .encode();
        for i in 0..wire.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut w = wire.clone();
                w[i] ^= x;
                if let Ok(Some((Frame::SynStream { block, .. }, _))) = Frame::parse(&w) {
                    let _ = HeaderDecoder::new().decode(&block);
                }
            }
        }
    }

    #[test]
    fn header_blocks_round_trip_with_shared_contexts() {
        let mut enc = HeaderEncoder::new();
        let mut dec = HeaderDecoder::new();
        for i in 0..20 {
            let port = i.to_string();
            let headers = [
                ("streamType", "error"),
                ("port", port.as_str()),
                ("requestID", "0"),
            ];
            let block = enc.encode(&headers).unwrap();
            let got = dec.decode(&block).unwrap();
            assert_eq!(
                got,
                vec![
                    ("streamtype".to_string(), "error".to_string()),
                    ("port".into(), port.clone()),
                    ("requestid".into(), "0".into()),
                ]
            );
            assert_eq!(header(&got, "port"), Some(port.as_str()));
        }
        // Large values too.
        let big = "x".repeat(20_000);
        let block = enc.encode(&[("a", big.as_str())]).unwrap();
        assert_eq!(dec.decode(&block).unwrap()[0].1, big);
    }

    #[test]
    fn hostile_header_blocks_are_errors() {
        assert!(HeaderDecoder::new().decode(b"garbage").is_err());
        assert!(HeaderDecoder::new().decode(&[]).is_err());
        assert!(parse_block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        assert!(parse_block(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_block(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
        // A block that inflates beyond the limit.
        let mut enc = HeaderEncoder::new();
        let huge = "y".repeat(MAX_HEADER_BLOCK * 2);
        let block = enc.encode(&[("a", huge.as_str())]).unwrap();
        assert!(HeaderDecoder::new().decode(&block).is_err());
    }
}
