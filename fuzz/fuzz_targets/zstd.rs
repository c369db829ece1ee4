#![no_main]
//! Bounded zstd decompression: see `protocol::fuzz_props::zstd`.

use libfuzzer_sys::fuzz_target;
use protocol::fuzz_props;

fuzz_target!(|data: &[u8]| {
    fuzz_props::zstd(data);
});
