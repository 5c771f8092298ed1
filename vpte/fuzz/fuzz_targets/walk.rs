//! Fuzz the walker: arbitrary RAM contents and size, master PDE, page index
//! and access (decoded by `vpte::reference::WalkCase::from_bytes`). The walk
//! must not panic, must not read outside RAM, must read at most 4 entries
//! and write only entries it read, and must agree with the naive reference
//! walk in its result and in the memory it leaves; the prefault run it allows
//! must be exact. `vpte/tests/arbitrary_walk.rs` runs the same check as a
//! proptest in the normal test suite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpte::reference::WalkCase;

fuzz_target!(|data: &[u8]| {
    let case = WalkCase::from_bytes(data);
    if let Err(e) = case.check() {
        panic!("{e}\n{case:?}");
    }
});
