#![no_main]
//! HTTP/1.1 chunked request bodies: see `protocol::fuzz_props::http_chunked`.

use libfuzzer_sys::fuzz_target;
use protocol::fuzz_props;

fuzz_target!(|data: &[u8]| {
    fuzz_props::http_chunked(data);
});
