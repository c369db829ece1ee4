#![no_main]
//! HTTP/1.1 request heads: see `protocol::fuzz_props::http_head`.

use libfuzzer_sys::fuzz_target;
use protocol::fuzz_props;

fuzz_target!(|data: &[u8]| {
    fuzz_props::http_head(data);
});
