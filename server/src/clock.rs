//! The server's one wall clock: Unix time in milliseconds, as storage records it and as the
//! limiters count. (The engine keeps its own coarse per-shard clock for the hot path.)

/// Milliseconds since the Unix epoch (0 if the system clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A duration in milliseconds, saturating.
pub fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// RFC 3339 UTC to the second (`2026-11-27T23:41:30Z`) of Unix milliseconds, clamped to the years
/// 1970..=9999 that the format can write.
pub fn rfc3339(ms: i64) -> String {
    const LAST_MS: i64 = 253_402_300_799_999;
    let ms = u64::try_from(ms.clamp(0, LAST_MS)).unwrap_or(0);
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_823_999_000), "2026-11-27T23:59:59Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
    }
}
