//! Sans-IO wire formats of ringhub: bytes in, values out.
//!
//! This crate owns every parser and encoder that touches bytes a peer controls, and nothing else:
//! no sockets, no clocks, no threads, no configuration files. The engine drives these pieces over
//! its own buffers.
//!
//! - [`http`]: HTTP/1.1 request heads (bounded) and the response writer.
//! - [`ws`]: the WebSocket server handshake, subprotocol selection and the frame codec with
//!   reassembly, control frames and incremental UTF-8 validation.
//! - [`envelope`]: the native protocol (SPEC §4): typed client requests and server pushes in JSON
//!   and MessagePack, with the depth bound, C0 stripping and room-id validation.
//! - [`compression`]: zstd framing with the decompressed size bounded before allocation.
//! - [`socketio`]: Engine.IO v4 / Socket.IO v5 packets and their mapping to native requests.
//!
//! Every parser distinguishes "need more bytes" (`Ok(None)` or an equivalent) from "invalid" (an
//! error naming what was wrong), and every size a peer controls is bounded by a limit passed in.
//!
//! ```
//! use protocol::envelope::{decode_request, Format, Op, DecodeLimits};
//! let req = decode_request(br#"{"op":"join","room":"lobby","id":7}"#, Format::Json,
//!     &DecodeLimits::default()).unwrap();
//! assert_eq!(req.id, Some(7));
//! assert!(matches!(req.op, Op::Join { .. }));
//! ```
#![forbid(unsafe_code)]

pub mod codes;
pub mod compression;
pub mod envelope;
#[doc(hidden)]
pub mod fuzz_props;
pub mod http;
pub mod socketio;
pub mod ws;

pub use codes::{CloseCode, ErrorCode};
