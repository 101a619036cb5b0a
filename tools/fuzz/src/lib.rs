//! The fuzzing harnesses of cowdisk. The targets in `fuzz_targets/` are one-line wrappers around
//! [`harness`]; the root package's `tests/fuzz_regressions.rs` includes the same `harness`
//! module by path, so every saved input replays through exactly the code the fuzzer ran.

pub mod harness;
