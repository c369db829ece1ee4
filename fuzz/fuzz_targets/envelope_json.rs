#![no_main]
//! Native envelope in JSON: see `protocol::fuzz_props::envelope`.

use libfuzzer_sys::fuzz_target;
use protocol::envelope::Format;
use protocol::fuzz_props;

fuzz_target!(|data: &[u8]| {
    fuzz_props::envelope(data, Format::Json);
});
