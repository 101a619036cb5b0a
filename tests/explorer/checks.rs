//! Verdicts on the files of a crash state, apart from what the device reads: `check` of every
//! image as the crash left it and of the top once recovered, and a new output file being
//! absent or complete. Crash states are rebuilt as real sparse files for `check`.

use super::{bytes_of, Files, OUT, SIZE, TOP};
use crate::common::TempDir;
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::ops::check::{check, CheckOptions, CheckReport};
use cowdisk::ops::flatten::OutputFormat;
use cowdisk::storage::namespace::Namespace;
use cowdisk::storage::recording::RecordingDir;
use cowdisk::storage::{LockMode, MemStorage};
use cowdisk::{Chain, DiskRead};
use std::path::Path;
use std::sync::Arc;

/// `check` of an image whose file holds `bytes`, written to a scratch file (sparse).
pub fn check_bytes(bytes: &[u8]) -> Result<CheckReport, String> {
    let scratch = TempDir::new("crashcheck");
    let p = scratch.join("image.cow");
    write_sparse(&p, bytes).map_err(|e| format!("cannot write the image: {e}"))?;
    Ok(check(&p, &CheckOptions::default(), &|_, _| {}))
}

/// Runs `check` on every cowdisk image of the crash state (not temporary files) as a power
/// cut left it (before any repair): leaked space is allowed, an inconsistency is not.
pub(super) fn check_state(files: &Files) -> Result<(), String> {
    for (name, _, bytes) in files {
        // Temporary files (hidden names) may hold anything until they are complete.
        if !bytes.starts_with(&cowdisk::format::MAGIC) || name.to_string_lossy().starts_with('.') {
            continue;
        }
        let r = check_bytes(bytes)?;
        if !matches!(r.exit_code(), 0 | 3) || r.images.iter().any(|i| i.unreadable.is_some()) {
            return Err(format!("check finds {} corrupt: {r:?}", name.display()));
        }
    }
    Ok(())
}

/// Writes `bytes` to a new file at `p`, leaving its all-zero 4 KiB blocks as holes: a crash
/// state holds punched space as zeros, and `check` counts free space that holds data (not
/// holes) as leaked.
pub(super) fn write_sparse(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p)?;
    f.set_len(bytes.len() as u64)?;
    for (i, block) in bytes.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, i as u64 * 4096)?;
        }
    }
    Ok(())
}

/// The top of `dir` once recovered and closed: `check` finds it clean, with no leaked space
/// (opening a dirty image for writing reclaims what a crash leaked, §5.5) and not dirty.
pub(super) fn check_recovered(dir: &RecordingDir) -> Result<(), String> {
    let s = dir.open(Path::new(TOP), false, LockMode::None).map_err(|e| format!("top is missing: {e}"))?;
    let r = check_bytes(&bytes_of(s.as_ref()))?;
    if r.exit_code() != 0 || r.images.iter().any(|i| i.dirty) {
        return Err(format!("once recovered and closed, check finds the top unclean: {r:?}"));
    }
    Ok(())
}

/// A new output file, if its name survived, holds exactly the device it was made from.
pub(super) fn check_output(format: OutputFormat, bytes: Vec<u8>, expected: &[u8]) -> Result<(), String> {
    let dev = match format {
        OutputFormat::Raw => bytes,
        OutputFormat::Cowdisk => {
            let img = Image::open_on(Arc::new(MemStorage::from_bytes(bytes)), Path::new(OUT), OpenOptions::read_only())
                .map_err(|e| format!("the new output does not open: {e}"))?;
            let c = Chain::assemble(img, Vec::new(), None);
            let mut d = vec![0u8; SIZE as usize];
            c.read_at(&mut d, 0).map_err(|e| format!("the new output does not read: {e}"))?;
            d
        }
    };
    if dev != expected {
        return Err("the new output exists but does not hold the flattened device".into());
    }
    Ok(())
}
