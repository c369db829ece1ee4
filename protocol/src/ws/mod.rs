//! WebSocket (RFC 6455) for the server side: the upgrade handshake with subprotocol selection,
//! and the frame codec with reassembly, control frames and incremental UTF-8 validation.
//!
//! Built on tungstenite's frame-header and accept-key pieces, driven over the caller's buffers:
//! nothing here owns a socket or a per-connection read buffer.

pub mod frame;
pub mod handshake;

pub use frame::{
    Decoded, FrameError, Message, MessageDecoder, OpCode, apply_mask, encode_close, encode_frame,
    encode_frame_header, encode_masked_frame, frame_bytes,
};
pub use handshake::{
    HandshakeError, Subprotocol, UpgradeRequest, check_upgrade, select_subprotocol, write_accept,
};
