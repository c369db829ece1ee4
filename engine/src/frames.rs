//! Outbound frames encoded once per wire format in use and shared by every recipient: a push is
//! serialized once for each of JSON and MessagePack that has a reader (plain and zstd keys share
//! the one encoding) and once for Socket.IO, each result a complete WebSocket frame in one
//! `Bytes`. A message's plain encodings are also what its room's history keeps.

use bytes::Bytes;
use protocol::compression::{Compressor, should_compress};
use protocol::envelope::{Format, MessageRecord, Push, encode_push};
use protocol::socketio;
use protocol::ws::{self, Subprotocol};

use protocol::envelope::RoomId;

/// How a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Native(Subprotocol),
    SocketIo,
}

impl Dialect {
    pub(crate) fn key(self) -> FrameKey {
        match self {
            Dialect::Native(p) => FrameKey::of(p),
            Dialect::SocketIo => FrameKey::SocketIo,
        }
    }
}

/// The wire formats a frame is encoded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FrameKey {
    Json = 0,
    JsonZstd = 1,
    MsgPack = 2,
    MsgPackZstd = 3,
    SocketIo = 4,
}

pub(crate) const FRAME_KEYS: usize = 5;

impl FrameKey {
    pub(crate) const ALL: [FrameKey; FRAME_KEYS] = [
        FrameKey::Json,
        FrameKey::JsonZstd,
        FrameKey::MsgPack,
        FrameKey::MsgPackZstd,
        FrameKey::SocketIo,
    ];

    pub(crate) const fn of(protocol: Subprotocol) -> Self {
        match protocol {
            Subprotocol::Json => FrameKey::Json,
            Subprotocol::JsonZstd => FrameKey::JsonZstd,
            Subprotocol::Msgpack => FrameKey::MsgPack,
            Subprotocol::MsgpackZstd => FrameKey::MsgPackZstd,
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// The dialect a connection of this key speaks.
    pub(crate) const fn dialect(self) -> Dialect {
        match self {
            FrameKey::Json => Dialect::Native(Subprotocol::Json),
            FrameKey::JsonZstd => Dialect::Native(Subprotocol::JsonZstd),
            FrameKey::MsgPack => Dialect::Native(Subprotocol::Msgpack),
            FrameKey::MsgPackZstd => Dialect::Native(Subprotocol::MsgpackZstd),
            FrameKey::SocketIo => Dialect::SocketIo,
        }
    }

    /// The native format a connection of this key reads (`None` for Socket.IO).
    pub(crate) const fn format(self) -> Option<Format> {
        match self.native() {
            Some((format, _)) => Some(format),
            None => None,
        }
    }

    const fn native(self) -> Option<(Format, bool)> {
        match self {
            FrameKey::Json => Some((Format::Json, false)),
            FrameKey::JsonZstd => Some((Format::Json, true)),
            FrameKey::MsgPack => Some((Format::MsgPack, false)),
            FrameKey::MsgPackZstd => Some((Format::MsgPack, true)),
            FrameKey::SocketIo => None,
        }
    }
}

/// Encodes a native push as one complete frame for `key` (not Socket.IO), compressing above the
/// threshold for zstd keys. `None` only if encoding failed (logged by the caller).
pub(crate) fn encode_native(
    push: &Push<'_>,
    key: FrameKey,
    threshold: usize,
    compressor: &mut Compressor,
) -> Option<Bytes> {
    let (format, _) = key.native()?;
    let payload = encode_push(push, format).ok()?;
    frame_payload(&payload, key, threshold, compressor)
}

/// Frames a payload already encoded in `key`'s format: a text (JSON) or binary (MessagePack)
/// frame, or for a zstd key above the threshold a binary frame of its compression. `None` for
/// Socket.IO, or if compression failed.
pub(crate) fn frame_payload(
    payload: &[u8],
    key: FrameKey,
    threshold: usize,
    compressor: &mut Compressor,
) -> Option<Bytes> {
    let (format, zstd) = key.native()?;
    if zstd && should_compress(payload.len(), threshold) {
        let compressed = compressor.compress(payload).ok()?;
        return Some(ws::frame_bytes(ws::frame::BINARY, &compressed));
    }
    Some(ws::frame_bytes(opcode(format), payload))
}

fn opcode(format: Format) -> ws::frame::OpCode {
    if format == Format::Json {
        ws::frame::TEXT
    } else {
        ws::frame::BINARY
    }
}

/// A Socket.IO text packet as a frame.
pub(crate) fn socketio_frame(packet: &str) -> Bytes {
    ws::frame_bytes(ws::frame::TEXT, packet.as_bytes())
}

/// A message's plain encodings kept for history: `(JSON, MessagePack)`, at least one.
pub(crate) type Kept = (Option<Bytes>, Option<Bytes>);

/// A room's frames for every wire format in use, handed to each shard holding members.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) room: RoomId,
    pub(crate) frames: Frames,
    /// A presence diff: shed for connections already falling behind (SPEC §6).
    pub(crate) sheddable: bool,
}

/// One message's frames for every key with readers.
#[derive(Debug)]
pub(crate) struct Frames {
    by_key: [Option<Bytes>; FRAME_KEYS],
}

impl Frames {
    /// Encodes `record` for each key whose count in `in_use` is not zero; with `keep`, also
    /// the message as history keeps it, `(JSON, MessagePack)`: the plain payloads of the formats
    /// encoded (sharing the frames' bytes where a plain frame was made), or its MessagePack
    /// encoding when no native format was in use (at least one is there).
    pub(crate) fn message(
        record: &MessageRecord,
        in_use: &[u32; FRAME_KEYS],
        threshold: usize,
        compressor: &mut Compressor,
        keep: bool,
    ) -> (Self, Option<Kept>) {
        let push = Push::Message(record);
        let mut by_key: [Option<Bytes>; FRAME_KEYS] = Default::default();
        let mut kept: [Option<Bytes>; 2] = [None, None];
        for (f, format) in Format::ALL.into_iter().enumerate() {
            let (plain, zstd) = match format {
                Format::Json => (FrameKey::Json, FrameKey::JsonZstd),
                Format::MsgPack => (FrameKey::MsgPack, FrameKey::MsgPackZstd),
            };
            let wanted = in_use[plain.index()] > 0 || in_use[zstd.index()] > 0;
            if !wanted {
                continue;
            }
            let Ok(mut payload) = encode_push(&push, format) else {
                continue;
            };
            let plain_frame = (in_use[plain.index()] > 0
                || !should_compress(payload.len(), threshold))
            .then(|| ws::frame_bytes(opcode(format), &payload));
            if in_use[zstd.index()] > 0 {
                by_key[zstd.index()] = match &plain_frame {
                    Some(frame) if !should_compress(payload.len(), threshold) => {
                        Some(frame.clone())
                    }
                    _ => frame_payload(&payload, zstd, threshold, compressor),
                };
            }
            if keep {
                kept[f] = Some(match &plain_frame {
                    // The frame's payload, shared: history costs no copy.
                    Some(frame) => frame.slice(frame.len() - payload.len()..),
                    None => {
                        payload.shrink_to_fit();
                        Bytes::from(payload)
                    }
                });
            }
            if in_use[plain.index()] > 0 {
                by_key[plain.index()] = plain_frame;
            }
        }
        if in_use[FrameKey::SocketIo.index()] > 0 {
            by_key[FrameKey::SocketIo.index()] =
                Some(socketio_frame(&socketio::encode_message_event(record)));
        }
        let stored = keep.then(|| {
            let [json, mut msgpack] = kept;
            if json.is_none() && msgpack.is_none() {
                msgpack = encode_push(&push, Format::MsgPack).ok().map(Bytes::from);
            }
            (json.is_some() || msgpack.is_some()).then_some((json, msgpack))
        });
        (Self { by_key }, stored.flatten())
    }

    /// Encodes a native push (and its Socket.IO twin, built by `sio`) for the keys in use.
    pub(crate) fn push(
        push: &Push<'_>,
        sio: impl FnOnce() -> String,
        in_use: &[u32; FRAME_KEYS],
        threshold: usize,
        compressor: &mut Compressor,
    ) -> Self {
        let mut sio = Some(sio);
        let by_key = std::array::from_fn(|i| {
            let key = FrameKey::ALL[i];
            if in_use[i] == 0 {
                return None;
            }
            match key {
                FrameKey::SocketIo => sio.take().map(|f| socketio_frame(&f())),
                _ => encode_native(push, key, threshold, compressor),
            }
        });
        Self { by_key }
    }

    pub(crate) fn get(&self, key: FrameKey) -> Option<&Bytes> {
        self.by_key[key.index()].as_ref()
    }
}
