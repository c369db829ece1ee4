//! Properties every parser must keep on arbitrary bytes, shared by the cargo-fuzz targets and by
//! the `cargo test` replay of their corpora. Each function panics when a property fails, which is
//! what a fuzzer reports; none may panic for any other reason.

use crate::compression::{Compressor, Decompressor, ZstdError};
use crate::envelope::{DecodeLimits, Format, decode_request, decode_value, encode_request};
use crate::http::{ChunkedDecoder, HttpError, HttpLimits, parse_request_head};
use crate::socketio;
use crate::ws::MessageDecoder;

/// HTTP head: parsing is prefix-stable (a complete head parses the same with more bytes after
/// it), the head length is within the input and the bound.
pub fn http_head(data: &[u8]) {
    let limits = HttpLimits {
        max_headers: 16,
        max_head_bytes: 2048,
        max_body_bytes: 4096,
    };
    if let Ok(Some(head)) = parse_request_head(data, &limits) {
        assert!(head.head_len <= data.len() && head.head_len <= limits.max_head_bytes);
        assert!(head.content_length <= limits.max_body_bytes);
        let mut longer = data[..head.head_len].to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(parse_request_head(&longer, &limits), Ok(Some(head)));
    }
}

/// Chunked bodies: the decoded body never passes its bound, the decoder uses no byte past the end
/// of the body, and feeding the input in two pieces (split anywhere) ends exactly as feeding it
/// whole: same error, or same body and same bytes used.
pub fn http_chunked(data: &[u8]) {
    const MAX: usize = 1024;
    let run = |pieces: &[&[u8]]| -> (Result<usize, HttpError>, bool, Vec<u8>) {
        let mut decoder = ChunkedDecoder::new(MAX);
        let mut used = 0;
        for piece in pieces {
            if decoder.is_done() {
                break;
            }
            match decoder.feed(piece) {
                Ok(n) => {
                    assert!(n <= piece.len());
                    assert!(n == piece.len() || decoder.is_done(), "stopped early");
                    used += n;
                }
                Err(e) => return (Err(e), false, Vec::new()),
            }
        }
        let done = decoder.is_done();
        let body = decoder.into_body();
        assert!(body.len() <= MAX);
        (Ok(used), done, body)
    };
    let whole = run(&[data]);
    for split in [1, data.len() / 2, data.len().saturating_sub(1)] {
        let split = split.min(data.len());
        let pieces = run(&[&data[..split], &data[split..]]);
        assert_eq!(pieces, whole, "split at {split}");
    }
}

/// WebSocket frames: the decoder consumes within the input, never returns a message above the
/// bound, and "need more" consumes nothing.
pub fn ws_frames(data: &[u8]) {
    const MAX: usize = 1024;
    let mut buf = data.to_vec();
    let mut decoder = MessageDecoder::new();
    let mut offset = 0;
    while offset < buf.len() {
        match decoder.decode(&mut buf[offset..], MAX) {
            Ok(d) if d.consumed == 0 => {
                assert!(d.message.is_none());
                break;
            }
            Ok(d) => {
                assert!(offset + d.consumed <= data.len());
                if let Some(crate::ws::Message::Text(p) | crate::ws::Message::Binary(p)) =
                    &d.message
                {
                    assert!(p.as_bytes().len() <= MAX);
                }
                if let Some(crate::ws::Message::Text(p)) = &d.message {
                    assert!(std::str::from_utf8(p.as_bytes()).is_ok());
                }
                offset += d.consumed;
            }
            Err(_) => break,
        }
    }
}

/// Envelope in `format`: a decoded request re-encodes to bytes that decode to the same request,
/// in both formats (JSON and MessagePack agree).
pub fn envelope(data: &[u8], format: Format) {
    let limits = DecodeLimits {
        max_message_bytes: 8192,
        max_depth: 8,
        max_resume_rooms: 16,
    };
    if let Ok(request) = decode_request(data, format, &limits) {
        for other in Format::ALL {
            let bytes = encode_request(&request, other);
            let again = decode_request(
                &bytes,
                other,
                &DecodeLimits {
                    max_message_bytes: usize::MAX,
                    ..limits
                },
            );
            assert_eq!(again.as_ref(), Ok(&request), "{other:?}");
        }
    }
    if let Ok(value) = decode_value(data, format, &limits) {
        assert!(value.depth() <= limits.max_depth);
    }
}

/// zstd: decompression never exceeds the bound, and what decompresses recompresses to a frame
/// that decompresses to the same bytes.
pub fn zstd(data: &[u8]) {
    const MAX: usize = 4096;
    let Ok(mut d) = Decompressor::new() else {
        return;
    };
    match d.decompress(data, MAX) {
        Ok(out) => {
            assert!(out.len() <= MAX);
            let Ok(mut c) = Compressor::new(1) else {
                return;
            };
            let Ok(frame) = c.compress(&out) else { return };
            assert_eq!(d.decompress(&frame, MAX).as_deref(), Ok(&out[..]));
        }
        Err(ZstdError::NoMemory) => {}
        Err(_) => {}
    }
}

/// Engine.IO / Socket.IO: parsing never panics, a parsed event maps to a request whose id is the
/// ack id, and re-encoding an ack parses back as an ACK with that id.
pub fn socketio(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = DecodeLimits {
        max_message_bytes: 8192,
        max_depth: 8,
        max_resume_rooms: 16,
    };
    let Ok(socketio::EnginePacket::Message(inner)) = socketio::parse_engine_packet(text) else {
        return;
    };
    let Ok(packet) = socketio::parse_socket_packet(inner) else {
        return;
    };
    if packet.kind == socketio::PacketType::Event
        && let Ok(request) = socketio::decode_event(&packet, &limits)
    {
        assert_eq!(request.id, packet.ack_id);
    }
    if let Some(id) = packet.ack_id {
        let ack = socketio::encode_ack(id, &socketio::AckPayload::Ok);
        let parsed = socketio::parse_engine_packet(&ack).ok();
        let Some(socketio::EnginePacket::Message(body)) = parsed else {
            panic!("ack not a message")
        };
        assert_eq!(
            socketio::parse_socket_packet(body).map(|p| p.ack_id),
            Ok(Some(id))
        );
    }
    let _ = socketio::connect_token(&packet, &limits);
}
