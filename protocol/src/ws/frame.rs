//! The WebSocket frame codec of the server side: decoding of masked client frames over the
//! caller's buffer (unmasked in place, no copy for an unfragmented message), reassembly of
//! fragmented messages bounded before allocation, control frames, close codes and incremental
//! UTF-8 validation of text; encoding of unmasked server frames (and masked ones for clients).

use std::io::Cursor;

use bytes::Bytes;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data};

pub use tungstenite::protocol::frame::coding::OpCode;

use crate::CloseCode;

/// Why a frame stream was refused. Each maps to the close code the server sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RFC 6455 violation: unmasked client frame, reserved bits or opcode, fragmented or
    /// oversized control frame, continuation out of place, bad close payload (1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A message (all fragments together) longer than the bound (1009).
    #[error("message larger than {0} bytes")]
    TooBig(usize),
    /// A text message or close reason that is not UTF-8 (1007).
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
}

impl FrameError {
    /// The close code that answers this error.
    pub const fn close_code(&self) -> CloseCode {
        match self {
            Self::Protocol(_) => CloseCode::PROTOCOL_ERROR,
            Self::TooBig(_) => CloseCode::TOO_BIG,
            Self::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
        }
    }
}

/// A complete message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, UTF-8 checked.
    Text(Payload<'a>),
    /// A binary message.
    Binary(Payload<'a>),
    /// A ping; answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// A close frame: the code (`NO_STATUS` when the payload was empty) and the reason.
    Close(CloseCode, &'a str),
}

/// A message body: borrowed from the input when it arrived in one frame, owned when reassembled.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Unmasked in place inside the caller's buffer.
    Borrowed(&'a [u8]),
    /// Reassembled from fragments.
    Owned(Vec<u8>),
}

impl Payload<'_> {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

/// The outcome of one [`MessageDecoder::decode`] call.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Bytes of the input consumed; 0 with no message means "need more bytes".
    pub consumed: usize,
    /// A complete message, if one ended in this call.
    pub message: Option<Message<'a>>,
}

/// A message being reassembled from fragments.
#[derive(Debug)]
struct Partial {
    text: bool,
    buf: Vec<u8>,
    /// Bytes of `buf` known to be valid UTF-8 (text only); a prefix of an incomplete sequence may
    /// follow.
    utf8_valid: usize,
}

/// Per-connection decoder state. Holds nothing between messages (an idle connection costs one
/// word); only a fragmented message in progress owns a buffer.
#[derive(Debug, Default)]
pub struct MessageDecoder {
    partial: Option<Box<Partial>>,
}

impl MessageDecoder {
    /// Largest control-frame payload (RFC 6455 §5.5).
    pub const MAX_CONTROL_PAYLOAD: usize = 125;

    /// A decoder with no message in progress.
    pub const fn new() -> Self {
        Self { partial: None }
    }

    /// Whether a fragmented message is in progress.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Decodes at most one frame from the start of `input` (client frames: must be masked).
    ///
    /// `max_message` bounds a message's total payload (inclusive) and is checked against the
    /// frame header before any byte of the payload is buffered. The frame's payload is unmasked in
    /// place. A frame that is not complete in `input` consumes nothing.
    pub fn decode<'a>(
        &mut self,
        input: &'a mut [u8],
        max_message: usize,
    ) -> Result<Decoded<'a>, FrameError> {
        let mut cursor = Cursor::new(&input[..]);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => {
                return Ok(Decoded {
                    consumed: 0,
                    message: None,
                });
            }
            Err(_) => return Err(FrameError::Protocol("reserved opcode")),
        };
        let header_len =
            usize::try_from(cursor.position()).map_err(|_| FrameError::Protocol("header"))?;
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        let Some(mask) = header.mask else {
            return Err(FrameError::Protocol("client frame not masked"));
        };
        let is_control = matches!(header.opcode, OpCode::Control(_));
        if is_control {
            if len > Self::MAX_CONTROL_PAYLOAD as u64 {
                return Err(FrameError::Protocol("control frame payload over 125 bytes"));
            }
            if !header.is_final {
                return Err(FrameError::Protocol("fragmented control frame"));
            }
        } else {
            let already = self.partial.as_ref().map_or(0, |p| p.buf.len()) as u64;
            if len.saturating_add(already) > max_message as u64 {
                return Err(FrameError::TooBig(max_message));
            }
        }
        // The bound above (or 125 for control) makes `len` fit in usize.
        let len = usize::try_from(len).map_err(|_| FrameError::TooBig(max_message))?;
        let frame_len = header_len + len;
        if input.len() < frame_len {
            return Ok(Decoded {
                consumed: 0,
                message: None,
            });
        }
        let payload = &mut input[header_len..frame_len];
        apply_mask(payload, mask);
        let payload: &'a [u8] = payload;
        let message = match header.opcode {
            OpCode::Control(Control::Ping) => Some(Message::Ping(payload)),
            OpCode::Control(Control::Pong) => Some(Message::Pong(payload)),
            OpCode::Control(Control::Close) => Some(parse_close(payload)?),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(FrameError::Protocol("reserved opcode"));
            }
            OpCode::Data(Data::Continue) => self.continue_message(payload, header.is_final)?,
            OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
                if self.partial.is_some() {
                    return Err(FrameError::Protocol(
                        "new message before the last one ended",
                    ));
                }
                let text = kind == Data::Text;
                if header.is_final {
                    if text {
                        std::str::from_utf8(payload).map_err(|_| FrameError::InvalidUtf8)?;
                        Some(Message::Text(Payload::Borrowed(payload)))
                    } else {
                        Some(Message::Binary(Payload::Borrowed(payload)))
                    }
                } else {
                    let mut partial = Box::new(Partial {
                        text,
                        buf: Vec::new(),
                        utf8_valid: 0,
                    });
                    append_fragment(&mut partial, payload, false)?;
                    self.partial = Some(partial);
                    None
                }
            }
        };
        Ok(Decoded {
            consumed: frame_len,
            message,
        })
    }

    fn continue_message<'a>(
        &mut self,
        payload: &[u8],
        fin: bool,
    ) -> Result<Option<Message<'a>>, FrameError> {
        let Some(partial) = self.partial.as_mut() else {
            return Err(FrameError::Protocol("continuation frame without a message"));
        };
        append_fragment(partial, payload, fin)?;
        if !fin {
            return Ok(None);
        }
        let partial = self.partial.take().map(|p| *p);
        Ok(partial.map(|p| {
            if p.text {
                Message::Text(Payload::Owned(p.buf))
            } else {
                Message::Binary(Payload::Owned(p.buf))
            }
        }))
    }
}

/// Appends a fragment and validates the UTF-8 of text as far as it goes, failing fast on an
/// invalid sequence and, at the final fragment, on an incomplete one.
fn append_fragment(partial: &mut Partial, payload: &[u8], fin: bool) -> Result<(), FrameError> {
    partial.buf.extend_from_slice(payload);
    if !partial.text {
        return Ok(());
    }
    match std::str::from_utf8(&partial.buf[partial.utf8_valid..]) {
        Ok(_) => partial.utf8_valid = partial.buf.len(),
        Err(e) if e.error_len().is_none() && !fin => partial.utf8_valid += e.valid_up_to(),
        Err(_) => return Err(FrameError::InvalidUtf8),
    }
    Ok(())
}

fn parse_close(payload: &[u8]) -> Result<Message<'_>, FrameError> {
    match payload {
        [] => Ok(Message::Close(CloseCode::NO_STATUS, "")),
        [_] => Err(FrameError::Protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_valid_on_wire() {
                return Err(FrameError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Message::Close(code, reason))
        }
    }
}

/// XORs `buf` with the 4-byte `mask` (RFC 6455 §5.3), eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Appends an unmasked frame header (server to client).
pub fn encode_frame_header(out: &mut Vec<u8>, opcode: OpCode, fin: bool, len: usize) {
    let header = FrameHeader {
        is_final: fin,
        opcode,
        ..FrameHeader::default()
    };
    // Writing into a Vec cannot fail.
    let _ = header.format(len as u64, out);
}

/// Appends a whole unmasked frame.
pub fn encode_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    out.reserve(10 + payload.len());
    encode_frame_header(out, opcode, true, payload.len());
    out.extend_from_slice(payload);
}

/// One unmasked frame in a shared buffer: encode once, hand the same bytes to every recipient.
pub fn frame_bytes(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(10 + payload.len());
    encode_frame(&mut out, opcode, payload);
    Bytes::from(out)
}

/// Appends a close frame with `code` and its SPEC reason.
pub fn encode_close(out: &mut Vec<u8>, code: CloseCode) {
    let reason = code.reason().as_bytes();
    let mut payload = Vec::with_capacity(2 + reason.len());
    if code != CloseCode::NO_STATUS {
        payload.extend_from_slice(&code.0.to_be_bytes());
        payload.extend_from_slice(reason);
    }
    encode_frame(out, OpCode::Control(Control::Close), &payload);
}

/// Appends a masked frame (client to server: tests, the load generator).
pub fn encode_masked_frame(
    out: &mut Vec<u8>,
    opcode: OpCode,
    fin: bool,
    payload: &[u8],
    mask: [u8; 4],
) {
    let header = FrameHeader {
        is_final: fin,
        opcode,
        mask: Some(mask),
        ..FrameHeader::default()
    };
    let _ = header.format(payload.len() as u64, out);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Text opcode.
pub const TEXT: OpCode = OpCode::Data(Data::Text);
/// Binary opcode.
pub const BINARY: OpCode = OpCode::Data(Data::Binary);
/// Continuation opcode.
pub const CONTINUE: OpCode = OpCode::Data(Data::Continue);
/// Ping opcode.
pub const PING: OpCode = OpCode::Control(Control::Ping);
/// Pong opcode.
pub const PONG: OpCode = OpCode::Control(Control::Pong);
/// Close opcode.
pub const CLOSE: OpCode = OpCode::Control(Control::Close);

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<(String, Vec<u8>)>, FrameError> {
        let mut buf = bytes.to_vec();
        let mut decoder = MessageDecoder::new();
        let mut offset = 0;
        let mut out = Vec::new();
        loop {
            let d = decoder.decode(&mut buf[offset..], max)?;
            if d.consumed == 0 {
                return Ok(out);
            }
            offset += d.consumed;
            if let Some(m) = d.message {
                out.push(match m {
                    Message::Text(p) => ("text".into(), p.as_bytes().to_vec()),
                    Message::Binary(p) => ("binary".into(), p.as_bytes().to_vec()),
                    Message::Ping(p) => ("ping".into(), p.to_vec()),
                    Message::Pong(p) => ("pong".into(), p.to_vec()),
                    Message::Close(c, r) => (format!("close {}", c.0), r.as_bytes().to_vec()),
                });
            }
        }
    }

    #[test]
    fn rfc6455_single_frame_masked_text() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            decode_all(&frame, 100).unwrap(),
            vec![("text".into(), b"Hello".to_vec())]
        );
    }

    #[test]
    fn rfc6455_unmasked_server_frames() {
        // RFC 6455 §5.7: unmasked "Hello", and an unmasked ping "Hello".
        let mut out = Vec::new();
        encode_frame(&mut out, TEXT, b"Hello");
        assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        let mut out = Vec::new();
        encode_frame(&mut out, PING, b"Hello");
        assert_eq!(out, [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        // 256 bytes uses the 16-bit length, 64 KiB the 64-bit one.
        assert_eq!(
            &frame_bytes(BINARY, &[0u8; 256])[..4],
            &[0x82, 0x7E, 0x01, 0x00]
        );
        assert_eq!(
            &frame_bytes(BINARY, &[0u8; 65536])[..10],
            &[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]
        );
    }

    #[test]
    fn rfc6455_fragmented_text_with_interleaved_ping() {
        // "Hel" + ping + "lo", masked.
        let mut wire = Vec::new();
        encode_masked_frame(&mut wire, TEXT, false, b"Hel", MASK);
        encode_masked_frame(&mut wire, PING, true, b"x", MASK);
        encode_masked_frame(&mut wire, CONTINUE, true, b"lo", MASK);
        let got = decode_all(&wire, 100).unwrap();
        assert_eq!(
            got,
            vec![
                ("ping".into(), b"x".to_vec()),
                ("text".into(), b"Hello".to_vec())
            ]
        );
    }

    #[test]
    fn partial_frames_consume_nothing() {
        let mut wire = Vec::new();
        encode_masked_frame(&mut wire, BINARY, true, &[7u8; 300], MASK);
        let mut decoder = MessageDecoder::new();
        for cut in 0..wire.len() {
            let mut part = wire[..cut].to_vec();
            assert_eq!(
                decoder.decode(&mut part, 1000).unwrap(),
                Decoded {
                    consumed: 0,
                    message: None
                }
            );
        }
    }

    #[test]
    fn size_bound_is_inclusive_and_checked_from_the_header() {
        let mut wire = Vec::new();
        encode_masked_frame(&mut wire, BINARY, true, &[1u8; 64], MASK);
        assert_eq!(decode_all(&wire, 64).unwrap().len(), 1);
        assert_eq!(decode_all(&wire, 63), Err(FrameError::TooBig(63)));
        // A header claiming 2^63 bytes is refused before anything is buffered.
        let mut huge = vec![0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        huge.extend_from_slice(&MASK);
        assert_eq!(decode_all(&huge, 65536), Err(FrameError::TooBig(65536)));
        // The bound applies to the sum of fragments.
        let mut wire = Vec::new();
        encode_masked_frame(&mut wire, TEXT, false, &[b'a'; 40], MASK);
        encode_masked_frame(&mut wire, CONTINUE, true, &[b'a'; 40], MASK);
        assert_eq!(decode_all(&wire, 79), Err(FrameError::TooBig(79)));
        assert_eq!(decode_all(&wire, 80).unwrap()[0].1.len(), 80);
    }

    #[test]
    fn protocol_violations() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (
                vec![0x81, 0x00],
                FrameError::Protocol("client frame not masked"),
            ),
            (
                vec![0xC1, 0x80, 0, 0, 0, 0],
                FrameError::Protocol("reserved bits set"),
            ),
            (
                vec![0x83, 0x80, 0, 0, 0, 0],
                FrameError::Protocol("reserved opcode"),
            ),
            (
                vec![0x09, 0x80, 0, 0, 0, 0],
                FrameError::Protocol("fragmented control frame"),
            ),
            (
                vec![0x80, 0x80, 0, 0, 0, 0],
                FrameError::Protocol("continuation frame without a message"),
            ),
            (
                vec![0x88, 0x81, 0, 0, 0, 0, 3],
                FrameError::Protocol("close payload of one byte"),
            ),
            (
                vec![0x88, 0x82, 0, 0, 0, 0, 0x03, 0xED],
                FrameError::Protocol("invalid close code"),
            ),
        ];
        for (wire, err) in cases {
            assert_eq!(decode_all(&wire, 100), Err(err), "{wire:?}");
        }
        let mut big_ping = Vec::new();
        encode_masked_frame(&mut big_ping, PING, true, &[0u8; 126], MASK);
        assert_eq!(
            decode_all(&big_ping, 1000),
            Err(FrameError::Protocol("control frame payload over 125 bytes"))
        );
        let mut interleaved = Vec::new();
        encode_masked_frame(&mut interleaved, TEXT, false, b"a", MASK);
        encode_masked_frame(&mut interleaved, TEXT, true, b"b", MASK);
        assert_eq!(
            decode_all(&interleaved, 100),
            Err(FrameError::Protocol(
                "new message before the last one ended"
            ))
        );
    }

    #[test]
    fn utf8_is_checked_incrementally_across_fragments() {
        let euro = "€".as_bytes(); // E2 82 AC split across fragments is fine
        let mut wire = Vec::new();
        encode_masked_frame(&mut wire, TEXT, false, &euro[..1], MASK);
        encode_masked_frame(&mut wire, CONTINUE, false, &euro[1..2], MASK);
        encode_masked_frame(&mut wire, CONTINUE, true, &euro[2..], MASK);
        assert_eq!(
            decode_all(&wire, 100).unwrap(),
            vec![("text".into(), euro.to_vec())]
        );
        // An invalid byte fails at its fragment, before the message ends.
        let mut wire = Vec::new();
        encode_masked_frame(&mut wire, TEXT, false, &[b'a', 0xFF], MASK);
        assert_eq!(decode_all(&wire, 100), Err(FrameError::InvalidUtf8));
        // A sequence cut off by the final fragment fails.
        let mut wire = Vec::new();
        encode_masked_frame(&mut wire, TEXT, false, b"a", MASK);
        encode_masked_frame(&mut wire, CONTINUE, true, &euro[..2], MASK);
        assert_eq!(decode_all(&wire, 100), Err(FrameError::InvalidUtf8));
        assert_eq!(
            FrameError::InvalidUtf8.close_code(),
            CloseCode::INVALID_PAYLOAD
        );
    }

    #[test]
    fn close_frames_carry_code_and_reason() {
        let mut wire = Vec::new();
        let mut payload = 4001u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        encode_masked_frame(&mut wire, CLOSE, true, &payload, MASK);
        assert_eq!(
            decode_all(&wire, 10).unwrap(),
            vec![("close 4001".into(), b"bye".to_vec())]
        );
        let mut out = Vec::new();
        encode_close(&mut out, CloseCode::SLOW_CONSUMER);
        assert_eq!(&out[..4], &[0x88, 15, 0x0F, 0xAB]);
        assert_eq!(&out[4..], b"slow_consumer");
    }

    #[test]
    fn mask_matches_the_bytewise_definition_at_every_length_and_offset() {
        let data: Vec<u8> = (0..=255u8).collect();
        for start in 0..8 {
            for len in 0..40 {
                let mut fast = data[start..start + len].to_vec();
                apply_mask(&mut fast, MASK);
                let slow: Vec<u8> = data[start..start + len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ MASK[i % 4])
                    .collect();
                assert_eq!(fast, slow);
            }
        }
    }
}
