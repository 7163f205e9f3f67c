//! Fuzzes the parser of client text frames: every byte a client sends on
//! `/ws` reaches it. See `switchyard_protocol::fuzzing::client_frame` for the
//! property checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchyard_protocol::fuzzing::client_frame(data);
});
