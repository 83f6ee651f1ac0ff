//! A client's byte stream to the streaming server, read as SPDY/3.1 frames one after another
//! (as the exec and port-forward sessions read them), header blocks through one shared zlib
//! context: the parsers must return an error, never panic, loop or inflate without bound; a
//! frame parsed is re-encoded to the same frame.
#![no_main]

use carapace::streaming::spdy::{Frame, HeaderDecoder, MAX_HEADER_BLOCK};
use carapace::streaming::spdy_portforward::StreamInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dec = HeaderDecoder::new();
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::parse(rest) {
        assert!((8..=rest.len()).contains(&used));
        rest = &rest[used..];
        match &frame {
            Frame::SynStream {
                stream_id, block, ..
            } => {
                if let Ok(headers) = dec.decode(block) {
                    let size: usize = headers.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
                    assert!(size <= MAX_HEADER_BLOCK);
                    let _ = StreamInfo::parse(&headers, *stream_id);
                }
            }
            Frame::SynReply { block, .. } | Frame::Headers { block, .. } => {
                let _ = dec.decode(block);
            }
            _ => {}
        }
        if !matches!(frame, Frame::Unknown(_)) {
            let wire = frame.encode();
            assert_eq!(Frame::parse(&wire), Ok(Some((frame, wire.len()))));
        }
    }
});
