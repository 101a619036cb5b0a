#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cowdisk_fuzz::harness::nbd_tls::run(data);
});
