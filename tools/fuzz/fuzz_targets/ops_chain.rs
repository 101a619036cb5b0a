#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cowdisk_fuzz::harness::ops_chain::run(data);
});
