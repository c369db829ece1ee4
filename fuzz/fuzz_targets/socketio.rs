#![no_main]
//! Engine.IO / Socket.IO packets: see `protocol::fuzz_props::socketio`.

use libfuzzer_sys::fuzz_target;
use protocol::fuzz_props;

fuzz_target!(|data: &[u8]| {
    fuzz_props::socketio(data);
});
