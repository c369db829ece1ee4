//! Outbound frames encoded once per wire format in use and shared by every recipient: a push is
//! serialized once for each of JSON, JSON+zstd, MessagePack, MessagePack+zstd and Socket.IO that
//! has a reader, each result a complete WebSocket frame in one `Bytes`.

use bytes::Bytes;
use protocol::compression::{Compressor, should_compress};
use protocol::envelope::{Format, MessageRecord, Push, encode_push};
use protocol::socketio;
use protocol::ws::{self, Subprotocol};

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
    pub(crate) const fn dialect(self) -> crate::ws::Dialect {
        match self {
            FrameKey::Json => crate::ws::Dialect::Native(Subprotocol::Json),
            FrameKey::JsonZstd => crate::ws::Dialect::Native(Subprotocol::JsonZstd),
            FrameKey::MsgPack => crate::ws::Dialect::Native(Subprotocol::Msgpack),
            FrameKey::MsgPackZstd => crate::ws::Dialect::Native(Subprotocol::MsgpackZstd),
            FrameKey::SocketIo => crate::ws::Dialect::SocketIo,
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
    let (format, zstd) = key.native()?;
    let payload = encode_push(push, format).ok()?;
    if zstd && should_compress(payload.len(), threshold) {
        let compressed = compressor.compress(&payload).ok()?;
        return Some(ws::frame_bytes(ws::frame::BINARY, &compressed));
    }
    let opcode = if format == Format::Json {
        ws::frame::TEXT
    } else {
        ws::frame::BINARY
    };
    Some(ws::frame_bytes(opcode, &payload))
}

/// A Socket.IO text packet as a frame.
pub(crate) fn socketio_frame(packet: &str) -> Bytes {
    ws::frame_bytes(ws::frame::TEXT, packet.as_bytes())
}

/// One message's frames for every key with readers.
#[derive(Debug)]
pub(crate) struct Frames {
    by_key: [Option<Bytes>; FRAME_KEYS],
}

impl Frames {
    /// Encodes `record` for each key whose count in `in_use` is not zero.
    pub(crate) fn message(
        record: &MessageRecord,
        in_use: &[u32; FRAME_KEYS],
        threshold: usize,
        compressor: &mut Compressor,
    ) -> Self {
        let push = Push::Message(record);
        let by_key = std::array::from_fn(|i| {
            let key = FrameKey::ALL[i];
            if in_use[i] == 0 {
                return None;
            }
            match key {
                FrameKey::SocketIo => Some(socketio_frame(&socketio::encode_message_event(record))),
                _ => encode_native(&push, key, threshold, compressor),
            }
        });
        Self { by_key }
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
