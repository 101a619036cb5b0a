//! Verdicts on the files of a crash state, apart from what the device reads: `check` of every
//! image as the crash left it and of the top once recovered, and a new output file being
//! absent or complete. Crash states are rebuilt as real sparse files for `check`.

use super::{bytes_of, Files, OUT, SIZE, TOP};
use crate::common::{write_sparse, TempDir};
use cowdisk::format::{FLAG_DIRTY, FLAG_FROZEN};
use cowdisk::layer::{Image, OpenOptions};
use cowdisk::ops::check::{check, CheckOptions, CheckReport};
use cowdisk::ops::flatten::OutputFormat;
use cowdisk::storage::namespace::Namespace;
use cowdisk::storage::recording::RecordingDir;
use cowdisk::storage::{LockMode, MemStorage};
use cowdisk::{Chain, DiskRead};
use std::path::{Path, PathBuf};
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

/// The top of `dir` once recovered and closed: `check` finds it clean, with no leaked space
/// (opening a dirty image for writing reclaims what a crash leaked, §5.5) and not dirty.
pub(super) fn check_recovered(dir: &RecordingDir) -> Result<(), String> {
    let s = dir.open(Path::new(TOP), false, LockMode::None).map_err(|e| format!("top is missing: {e}"))?;
    let r = check_bytes(&bytes_of(s.as_ref()))?;
    if r.exit_code() != 0 || r.images.iter().any(|i| i.dirty) {
        return Err(format!("once recovered and closed, check finds the top unclean: {r:?}"));
    }
    // Frozen layers beside it (the middle layer, what a compaction or a snapshot made): nothing
    // opens them for writing again, so none that is clean may hold space that no map points at
    // (a freeze makes its punches durable before its header, format-spec §5.5, §5.9). One left
    // DIRTY (a commit into it cut short) may: the commit run again opens it for writing, which
    // reclaims that space, and `check` reports it dirty meanwhile.
    for name in dir.siblings(Path::new(TOP)) {
        let name = PathBuf::from(name);
        if name == Path::new(TOP) || name.to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(s) = dir.open(&name, false, LockMode::None) else { continue };
        let bytes = bytes_of(s.as_ref());
        let frozen_clean =
            Image::open_on(Arc::new(MemStorage::from_bytes(bytes.clone())), &name, OpenOptions::read_only())
                .is_ok_and(|i| i.header().has_flag(FLAG_FROZEN) && !i.header().has_flag(FLAG_DIRTY));
        if !frozen_clean {
            continue;
        }
        let r = check_bytes(&bytes)?;
        if r.images.iter().any(|i| i.leaked_bytes > 0) {
            return Err(format!(
                "once recovered, check finds space leaked in the frozen layer {}: {r:?}",
                name.display()
            ));
        }
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
