//! zstd framing of SPEC §4: a binary WebSocket message that starts with the zstd magic holds
//! exactly one zstd frame whose content is one encoded message.
//!
//! Decompression is single-shot into a buffer whose capacity is the message bound, decided before
//! anything is allocated: a frame that declares a larger content size is refused from its header,
//! one that does not declare it fails when the bounded buffer is full. A bomb fails cleanly.

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx};

/// The zstd frame magic number, little-endian on the wire.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// The compression level used for outbound messages: fast, still well above 2× on chat JSON.
pub const DEFAULT_LEVEL: i32 = 3;

/// Why a zstd message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZstdError {
    /// Does not start with the zstd magic.
    #[error("not a zstd frame")]
    NotZstd,
    /// Decompresses (or declares it would) to more than the bound: close with 1009.
    #[error("decompressed size above {0} bytes")]
    TooLarge(usize),
    /// Corrupt, truncated, or followed by extra bytes.
    #[error("corrupt zstd frame: {0}")]
    Corrupt(&'static str),
    /// zstd could not get memory for a context.
    #[error("zstd context unavailable")]
    NoMemory,
}

/// Whether `bytes` begin with the zstd magic.
pub fn is_zstd(bytes: &[u8]) -> bool {
    bytes.starts_with(&ZSTD_MAGIC)
}

/// Whether a message of `len` bytes should be compressed for a zstd-capable connection.
pub const fn should_compress(len: usize, threshold: usize) -> bool {
    len > threshold
}

/// A reusable decompression context (one per shard).
pub struct Decompressor {
    ctx: DCtx<'static>,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    /// A new context.
    pub fn new() -> Result<Self, ZstdError> {
        DCtx::try_create()
            .map(|ctx| Self { ctx })
            .ok_or(ZstdError::NoMemory)
    }

    /// Decompresses one whole frame into at most `max` bytes (inclusive).
    pub fn decompress(&mut self, input: &[u8], max: usize) -> Result<Vec<u8>, ZstdError> {
        if !is_zstd(input) {
            return Err(ZstdError::NotZstd);
        }
        let frame_len = zstd_safe::find_frame_compressed_size(input)
            .map_err(|_| ZstdError::Corrupt("truncated or malformed frame"))?;
        if frame_len != input.len() {
            return Err(ZstdError::Corrupt("bytes after the frame"));
        }
        let declared = zstd_safe::get_frame_content_size(input)
            .map_err(|_| ZstdError::Corrupt("bad frame header"))?;
        let capacity = match declared {
            Some(n) if n > max as u64 => return Err(ZstdError::TooLarge(max)),
            // Bounded by `max` just above.
            Some(n) => usize::try_from(n).map_err(|_| ZstdError::TooLarge(max))?,
            None => max,
        };
        let mut out = Vec::with_capacity(capacity);
        match self.ctx.decompress(&mut out, input) {
            Ok(n) if declared.is_some_and(|d| d != n as u64) => {
                Err(ZstdError::Corrupt("content size mismatch"))
            }
            Ok(_) => Ok(out),
            Err(code) if zstd_safe::get_error_name(code).contains("too small") => {
                Err(ZstdError::TooLarge(max))
            }
            Err(_) => Err(ZstdError::Corrupt("corrupt data")),
        }
    }
}

/// A reusable compression context (one per shard). Frames carry their content size.
pub struct Compressor {
    ctx: CCtx<'static>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    /// A new context at `level`.
    pub fn new(level: i32) -> Result<Self, ZstdError> {
        let mut ctx = CCtx::try_create().ok_or(ZstdError::NoMemory)?;
        ctx.set_parameter(CParameter::CompressionLevel(level))
            .map_err(|_| ZstdError::NoMemory)?;
        Ok(Self { ctx })
    }

    /// Compresses `data` into one frame.
    pub fn compress(&mut self, data: &[u8]) -> Result<Vec<u8>, ZstdError> {
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
        self.ctx
            .compress2(&mut out, data)
            .map_err(|_| ZstdError::Corrupt("compression failed"))?;
        Ok(out)
    }
}

/// The largest compressed size of a `max`-byte message: the frame bound of a zstd connection.
pub fn compressed_bound(max: usize) -> usize {
    zstd_safe::compress_bound(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_declared_size() {
        let data =
            br#"{"op":"publish","room":"lobby","data":"hello hello hello hello hello"}"#.repeat(20);
        let frame = Compressor::new(DEFAULT_LEVEL)
            .unwrap()
            .compress(&data)
            .unwrap();
        assert!(is_zstd(&frame));
        assert!(frame.len() < data.len() / 4);
        assert_eq!(
            zstd_safe::get_frame_content_size(&frame).ok(),
            Some(Some(data.len() as u64))
        );
        let mut d = Decompressor::new().unwrap();
        assert_eq!(d.decompress(&frame, data.len()).unwrap(), data);
        assert_eq!(
            d.decompress(&frame, data.len() - 1),
            Err(ZstdError::TooLarge(data.len() - 1))
        );
    }

    #[test]
    fn bomb_without_declared_size_stops_at_the_bound() {
        // A streaming encoder does not declare the content size: 10 MiB of zeros.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &vec![0u8; 10 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 2048);
        assert_eq!(zstd_safe::get_frame_content_size(&bomb).ok(), Some(None));
        let mut d = Decompressor::new().unwrap();
        assert_eq!(d.decompress(&bomb, 65536), Err(ZstdError::TooLarge(65536)));
        // The context is still usable afterwards.
        let ok = Compressor::new(1).unwrap().compress(b"fine").unwrap();
        assert_eq!(d.decompress(&ok, 65536).unwrap(), b"fine");
    }

    #[test]
    fn garbage_and_trailing_bytes_are_corrupt() {
        let mut d = Decompressor::new().unwrap();
        assert_eq!(d.decompress(b"{\"op\":1}", 100), Err(ZstdError::NotZstd));
        assert!(matches!(
            d.decompress(&[0x28, 0xB5, 0x2F, 0xFD, 0, 0, 0], 100),
            Err(ZstdError::Corrupt(_))
        ));
        let mut two = Compressor::new(1).unwrap().compress(b"a").unwrap();
        two.extend_from_slice(&two.clone());
        assert_eq!(
            d.decompress(&two, 100),
            Err(ZstdError::Corrupt("bytes after the frame"))
        );
    }
}
