#![no_main]
//! WebSocket frame stream decoding: see `protocol::fuzz_props::ws_frames`.

use libfuzzer_sys::fuzz_target;
use protocol::fuzz_props;

fuzz_target!(|data: &[u8]| {
    fuzz_props::ws_frames(data);
});
