//! The native envelope of SPEC §4: client requests decoded from, and server pushes encoded to,
//! JSON (sonic-rs) or MessagePack (rmp-serde) carrying the same maps with the same keys.
//!
//! Decoding is bounded (message size, nesting depth, element counts reserved up front), strips C0
//! controls from `data`, validates room ids, and tells `unknown_op` apart from `invalid_message`.
//! Encoding writes each push once into a buffer that a broadcast shares among recipients.

mod push;
mod request;
mod room;
mod value;

pub use push::{
    EncodeError, MessageRecord, PresenceEntry, PresenceUser, Push, WelcomeLimits,
    encode_history_reply, encode_push, encode_push_into, encode_value,
};
pub use request::{
    MAX_EPOCH_LEN, MAX_HISTORY_LIMIT, MAX_ID, MAX_SESSION_LEN, MAX_TOKEN_LEN, Op, Request,
    ResumePoint, decode_request, encode_request,
};
pub use room::{EventName, RESERVED_EVENTS, RoomId, RoomIdError};
pub use value::{Strings, Value, ValueSeed, has_control, strip_c0};

use crate::ErrorCode;

/// The envelope encoding of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// JSON in text frames.
    Json,
    /// MessagePack (maps with string keys) in binary frames.
    MsgPack,
}

impl Format {
    /// Both formats, for encode-once-per-format loops.
    pub const ALL: [Format; 2] = [Format::Json, Format::MsgPack];
}

/// Bounds applied while decoding a client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest message in bytes, inclusive (`max_message_bytes`).
    pub max_message_bytes: usize,
    /// Deepest nesting, the envelope counting as 1 (`max_json_depth`).
    pub max_depth: usize,
    /// Most rooms a `resume` may name (`max_rooms_per_connection`).
    pub max_resume_rooms: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 65536,
            max_depth: 32,
            max_resume_rooms: 128,
        }
    }
}

/// Why a client message was refused: the `error` the server answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {reason}")]
pub struct DecodeError {
    /// `invalid_message`, `unknown_op` or `too_large`.
    pub code: ErrorCode,
    /// The request's `id`, when it was read before the failure.
    pub id: Option<u64>,
    /// A human-readable reason, safe to send back.
    pub reason: String,
}

impl DecodeError {
    /// An `invalid_message` whose reason is the first line of `reason`, at most 200 bytes: parser
    /// messages may quote the input, which is not echoed back at length.
    pub(crate) fn invalid(id: Option<u64>, reason: impl Into<String>) -> Self {
        let mut reason: String = reason.into();
        if let Some(line_end) = reason.find('\n') {
            reason.truncate(line_end);
        }
        if reason.len() > 200 {
            let mut cut = 200;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Self {
            code: ErrorCode::InvalidMessage,
            id,
            reason,
        }
    }
}

/// Decodes any value (a whole server push, say) under `limits`, for clients and tests.
pub fn decode_value(
    bytes: &[u8],
    format: Format,
    limits: &DecodeLimits,
) -> Result<Value, DecodeError> {
    if bytes.len() > limits.max_message_bytes {
        return Err(DecodeError {
            code: ErrorCode::TooLarge,
            id: None,
            reason: "message too large".into(),
        });
    }
    let seed = ValueSeed {
        level: 1,
        max_depth: limits.max_depth,
        strings: Strings::StripC0,
    };
    deserialize_seed(bytes, format, seed).map_err(|e| DecodeError::invalid(None, e))
}

/// Deserializes `bytes` in `format` with `seed`, refusing trailing bytes.
pub(crate) fn deserialize_seed<S, T>(bytes: &[u8], format: Format, seed: S) -> Result<T, String>
where
    S: for<'de> serde::de::DeserializeSeed<'de, Value = T>,
{
    match format {
        Format::Json => {
            let mut de = sonic_rs::Deserializer::from_slice(bytes);
            let value = seed.deserialize(&mut de).map_err(|e| e.to_string())?;
            de.end()
                .map_err(|_| "trailing bytes after the message".to_owned())?;
            Ok(value)
        }
        Format::MsgPack => {
            let mut rest = bytes;
            let value = {
                let mut de = rmp_serde::Deserializer::new(&mut rest);
                seed.deserialize(&mut de).map_err(|e| e.to_string())?
            };
            if rest.is_empty() {
                Ok(value)
            } else {
                Err("trailing bytes after the message".to_owned())
            }
        }
    }
}
