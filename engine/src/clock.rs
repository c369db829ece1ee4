//! The engine's clocks: wall-clock epoch milliseconds (the protocol's time unit) and a monotonic
//! clock for short intervals (timeouts, write delays, idle checks), in the widths the engine
//! stores. Nothing else here.

/// Wall-clock milliseconds since the Unix epoch (the protocol's time unit).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Microseconds on a monotonic clock since the first call (for short intervals only).
pub(crate) fn monotonic_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Milliseconds on the monotonic clock of [`monotonic_us`] in 32 bits: it wraps every 49 days, so
/// only differences of recent times are meaningful (`wrapping_sub`).
pub(crate) fn monotonic_ms32() -> u32 {
    u32::try_from((monotonic_us() / 1000) & u64::from(u32::MAX)).unwrap_or_default()
}

/// The low 32 bits of [`monotonic_us`]: it wraps every 71 minutes, so only differences of recent
/// times are meaningful (`wrapping_sub`).
pub(crate) fn monotonic_us32() -> u32 {
    u32::try_from(monotonic_us() & u64::from(u32::MAX)).unwrap_or_default()
}
