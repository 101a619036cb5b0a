//! Replays the saved fuzzing inputs in tests/fuzz_regressions/<target>/ through the very code
//! the fuzz targets run (tools/fuzz/src/harness, included here by path), without libFuzzer:
//! every input must run without a panic. See FUZZING.md.
//!
//! Inputs whose name starts with `bug-` reproduce a known, not yet fixed bug: the directory
//! replay skips them, and each has its own test below, ignored until the bug is fixed.

#[path = "../tools/fuzz/src/harness/mod.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions").join(target)
}

/// Runs every saved input of `target` (except known bugs), reporting all failures at once.
fn replay_dir(target: &str, run: fn(&[u8])) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir(target))
        .unwrap_or_else(|e| panic!("read {}: {e}", dir(target).display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("bug-"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no saved inputs for {target}");
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("read input");
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{} of {} saved {target} inputs panicked: {failed:#?}", failed.len(), files.len());
}

/// Runs one saved input (for the known-bug tests).
fn replay_one(target: &str, name: &str, run: fn(&[u8])) {
    let data = std::fs::read(dir(target).join(name)).expect("read input");
    run(&data);
}

#[test]
fn image_open_saved_inputs() {
    replay_dir("image_open", harness::image_open::run);
}

#[test]
fn image_ops_saved_inputs() {
    replay_dir("image_ops", harness::image_ops::run);
}

#[test]
fn nbd_server_saved_inputs() {
    replay_dir("nbd_server", harness::nbd_server::run);
}

#[test]
fn image_files_saved_inputs() {
    replay_dir("image_files", harness::image_ops::run_files);
}

#[test]
fn nbd_multi_saved_inputs() {
    replay_dir("nbd_multi", harness::nbd_multi::run);
}

#[test]
fn ops_chain_saved_inputs() {
    replay_dir("ops_chain", harness::ops_chain::run);
}

/// The nbd_tls harness gets where it should: an acceptable client through the TLS handshake
/// to plaintext replies, a client without the CA's certificate refused in the handshake.
/// Then every saved input runs. One test, not two: the harness's servers live in a static
/// whose socket directory this test removes at its end, and a second test could start after.
#[test]
fn nbd_tls_harness_reaches_options_over_tls_and_saved_inputs_run() {
    struct RemoveScratch;
    impl Drop for RemoveScratch {
        fn drop(&mut self) {
            harness::nbd_tls::remove_scratch();
        }
    }
    let _cleanup = RemoveScratch;
    let good = std::fs::read(dir("nbd_tls").join("verify-good-go")).unwrap();
    let seen = harness::nbd_tls::session(&good);
    assert!(seen.starttls && seen.handshake_done && seen.plaintext > 0, "{seen:?}");
    let foreign = std::fs::read(dir("nbd_tls").join("verify-foreign-go")).unwrap();
    let seen = harness::nbd_tls::session(&foreign);
    assert!(seen.starttls && seen.plaintext == 0 && seen.tls_error.is_some(), "{seen:?}");
    replay_dir("nbd_tls", harness::nbd_tls::run);
}

/// The harnesses' own checks work: a well-formed session reaches transmission and is checked.
#[test]
fn nbd_server_harness_reaches_transmission() {
    let data = std::fs::read(dir("nbd_server").join("structured-block-status")).unwrap();
    let (requests, reply_bytes) = harness::nbd_server::session(&data).expect("session reaches transmission");
    assert_eq!(requests, 3);
    assert!(reply_bytes > 0);
}

/// The image_open input format round-trips, and a plain image file is an input as it is.
#[test]
fn image_open_harness_splits_inputs() {
    let golden = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/standalone-4k.cow")).unwrap();
    let input = harness::image_open::join(&golden, b"ops", 3);
    let (image, ops, mode) = harness::image_open::split(&input);
    assert_eq!((image, ops, mode), (&golden[..], &b"ops"[..], 3));
    assert!(harness::image_open::opens(image));
    let (image, ops, mode) = harness::image_open::split(&golden);
    assert_eq!((image, ops, mode), (&golden[..], &[][..], 0));
}

// Fixed bugs: each input panicked before its fix (FUZZING.md).

#[test]
fn bug_empty_read_at_zero_image_open() {
    replay_one("image_open", "bug-empty-read-at-zero", harness::image_open::run);
}

#[test]
fn bug_empty_read_at_zero_image_ops() {
    replay_one("image_ops", "bug-empty-read-at-zero", harness::image_ops::run);
}

#[test]
fn bug_empty_read_at_zero_nbd_server() {
    replay_one("nbd_server", "bug-empty-read-at-zero", harness::nbd_server::run);
}
