//! Port-forward over vsock: one host connection to [`PORT_FORWARD_VSOCK_PORT`]
//! carries one forwarded TCP connection to `127.0.0.1:<port>` in the guest.
//!
//! ```text
//! host → agent   PORT <port>\n                  (at most MAX_REQUEST bytes)
//! agent → host   OK\n | ERR <message>\n         (at most MAX_REPLY bytes)
//! then both ways: chunks of u32-BE length + bytes (1..=MAX_CHUNK);
//!                 a zero length ends that direction (half-close)
//! ```
//!
//! The chunk framing exists only to carry half-close: hybrid-vsock
//! backends cannot (vhost-device-vsock turns a host EOF into a full
//! shutdown and ignores a guest's send-only shutdown), and kubectl relies
//! on it (it half-closes its data stream when the local client does).
//!
//! [`PORT_FORWARD_VSOCK_PORT`]: crate::PORT_FORWARD_VSOCK_PORT

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest request line, newline included (`PORT 65535\n` is 11 bytes).
pub const MAX_REQUEST: usize = 32;
/// Longest reply line, newline included.
pub const MAX_REPLY: usize = 512;
/// Largest chunk payload.
pub const MAX_CHUNK: usize = 64 * 1024;

/// A violation of the protocol by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("port-forward request line too long or not ended")]
    RequestTooLong,
    #[error("malformed port-forward request {0:?}")]
    BadRequest(String),
    #[error("port-forward reply line too long or not ended")]
    ReplyTooLong,
    #[error("malformed port-forward reply {0:?}")]
    BadReply(String),
    #[error("port-forward chunk of {0} bytes is larger than allowed")]
    ChunkTooLarge(usize),
}

/// The request line for `port`.
pub fn request(port: u16) -> String {
    format!("PORT {port}\n")
}

/// The port of a request line (without its newline); port 0 is refused.
pub fn parse_request(line: &[u8]) -> Result<u16, ProtocolError> {
    let bad = || ProtocolError::BadRequest(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let port = text.strip_prefix("PORT ").ok_or_else(bad)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(bad()),
    }
}

/// The reply line for a connected port.
pub const REPLY_OK: &str = "OK\n";

/// The reply line for a failure: the message on one line, bounded.
pub fn reply_error(message: &str) -> String {
    let mut line = String::from("ERR ");
    for c in message.chars() {
        if line.len() + c.len_utf8() > MAX_REPLY - 1 {
            break;
        }
        line.push(if c.is_control() { ' ' } else { c });
    }
    line.push('\n');
    line
}

/// `Ok(())` for `OK`, `Err(Ok(message))` for the agent's `ERR <message>`,
/// `Err(Err(_))` for anything else.
pub fn parse_reply(line: &[u8]) -> Result<(), Result<String, ProtocolError>> {
    let bad = || {
        Err(ProtocolError::BadReply(
            String::from_utf8_lossy(line).into_owned(),
        ))
    };
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    if text == "OK" {
        return Ok(());
    }
    match text.strip_prefix("ERR ") {
        Some(message) => Err(Ok(message.to_owned())),
        None => Err(bad()),
    }
}

/// Reads one line (without its newline) of at most `max` bytes, newline
/// included, one byte at a time: what follows belongs to the data path.
/// `None` when the peer closes before the newline, or the line is longer.
pub async fn read_line<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::with_capacity(max);
    loop {
        let mut byte = [0u8; 1];
        if r.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        if byte[0] == b'\n' {
            return Ok(Some(line));
        }
        if line.len() + 2 > max {
            return Ok(None);
        }
        line.push(byte[0]);
    }
}

/// Writes `data` as chunks (an empty `data` writes nothing: a zero length
/// would end the direction).
pub async fn write_chunk<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> std::io::Result<()> {
    for piece in data.chunks(MAX_CHUNK) {
        let mut frame = Vec::with_capacity(4 + piece.len());
        frame.extend_from_slice(&(piece.len() as u32).to_be_bytes());
        frame.extend_from_slice(piece);
        w.write_all(&frame).await?;
    }
    w.flush().await
}

/// Ends this direction.
pub async fn write_end<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(&0u32.to_be_bytes()).await?;
    w.flush().await
}

/// Reads the next chunk into `buf` (replacing its content): `Ok(false)` at
/// the end of the direction. A peer that closes without the end marker, or
/// sends an oversize chunk, is an error.
pub async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Ok(false);
    }
    if len > MAX_CHUNK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            ProtocolError::ChunkTooLarge(len),
        ));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(request(8080), "PORT 8080\n");
        assert_eq!(parse_request(b"PORT 8080"), Ok(8080));
        assert_eq!(parse_request(b"PORT 65535"), Ok(65535));
        for bad in [
            &b"PORT 0"[..],
            b"PORT 65536",
            b"PORT -1",
            b"PORT +80",
            b"PORT ",
            b"PORT 80 ",
            b"port 80",
            b"",
            b"\xff\xfe",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replies_round_trip_and_stay_bounded() {
        assert_eq!(parse_reply(REPLY_OK.trim_end().as_bytes()), Ok(()));
        let e = reply_error("connection refused\nsecond line");
        assert_eq!(e, "ERR connection refused second line\n");
        assert_eq!(
            parse_reply(e.trim_end().as_bytes()),
            Err(Ok("connection refused second line".into()))
        );
        let long = reply_error(&"é".repeat(1000));
        assert!(long.len() <= MAX_REPLY && long.ends_with('\n'));
        assert!(matches!(parse_reply(b"WHAT"), Err(Err(_))));
        assert!(matches!(parse_reply(b"\xff"), Err(Err(_))));
    }

    #[tokio::test]
    async fn lines_are_bounded_and_leave_the_rest() {
        let mut input: &[u8] = b"PORT 80\nrest";
        assert_eq!(
            read_line(&mut input, MAX_REQUEST).await.unwrap(),
            Some(b"PORT 80".to_vec())
        );
        assert_eq!(input, b"rest");
        let long = [b'x'; MAX_REQUEST * 2];
        assert_eq!(read_line(&mut &long[..], MAX_REQUEST).await.unwrap(), None);
        // Exactly at the bound (newline included) passes, one more fails.
        let mut at = vec![b'x'; MAX_REQUEST - 1];
        at.push(b'\n');
        assert!(read_line(&mut &at[..], MAX_REQUEST)
            .await
            .unwrap()
            .is_some());
        at.insert(0, b'x');
        assert_eq!(read_line(&mut &at[..], MAX_REQUEST).await.unwrap(), None);
        assert_eq!(
            read_line(&mut &b"PORT 1"[..], MAX_REQUEST).await.unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn chunks_carry_data_and_the_end() {
        let mut wire = Vec::new();
        write_chunk(&mut wire, b"hello").await.unwrap();
        write_chunk(&mut wire, b"").await.unwrap();
        let big = vec![7u8; MAX_CHUNK + 10];
        write_chunk(&mut wire, &big).await.unwrap();
        write_end(&mut wire).await.unwrap();
        assert_eq!(&wire[..9], b"\0\0\0\x05hello");
        let mut r = &wire[..];
        let mut buf = Vec::new();
        assert!(read_chunk(&mut r, &mut buf).await.unwrap());
        assert_eq!(buf, b"hello");
        assert!(read_chunk(&mut r, &mut buf).await.unwrap());
        assert_eq!(buf.len(), MAX_CHUNK);
        assert!(read_chunk(&mut r, &mut buf).await.unwrap());
        assert_eq!(buf.len(), 10);
        assert!(!read_chunk(&mut r, &mut buf).await.unwrap());
        // A close without the end marker, a truncated chunk, an oversize one.
        assert!(read_chunk(&mut r, &mut buf).await.is_err());
        assert!(read_chunk(&mut &b"\0\0\0\x05hel"[..], &mut buf)
            .await
            .is_err());
        let over = ((MAX_CHUNK + 1) as u32).to_be_bytes();
        assert!(read_chunk(&mut &over[..], &mut buf).await.is_err());
    }
}
