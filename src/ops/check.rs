//! Check: verify every checksum and invariant of an image (and optionally its whole chain),
//! count leaked space, and with repair reclaim leaks and clear the dirty flag.

use crate::chain::resolve_parent_path;
use crate::error::{ErrorKind, Result};
use crate::format::header::ParentFormat;
use crate::format::{FLAG_CORRUPT, FLAG_DIRTY};
use crate::layer::{Image, OpenOptions};
use crate::storage::{LockMode, Storage};
use crate::{Chain, ChainOptions};
use std::path::{Path, PathBuf};

/// The verdict on one image file.
#[derive(Debug, Clone, Default)]
pub struct ImageCheck {
    pub path: PathBuf,
    /// Corruption found (each a one-line description); empty when the image is sound.
    pub errors: Vec<String>,
    /// Bytes of the file that hold data but belong to nothing (left by a crash).
    pub leaked_bytes: u64,
    /// The dirty flag was set: the image was not closed cleanly (or is open right now).
    pub dirty: bool,
    /// Leaks punched and the dirty flag cleared by `repair`.
    pub repaired: bool,
}

#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub images: Vec<ImageCheck>,
}

impl CheckReport {
    pub fn corrupt(&self) -> bool {
        self.images.iter().any(|i| !i.errors.is_empty())
    }

    pub fn leaked_bytes(&self) -> u64 {
        self.images.iter().map(|i| i.leaked_bytes).sum()
    }

    /// The exit code `cowdisk check` uses: 0 clean, 3 leaked space only, 2 corrupted.
    pub fn exit_code(&self) -> u8 {
        if self.corrupt() {
            2
        } else if self
            .images
            .iter()
            .any(|i| i.leaked_bytes > 0 && !i.repaired)
        {
            3
        } else {
            0
        }
    }
}

/// Data-holding bytes inside the given (unreferenced) ranges.
fn data_in(storage: &dyn Storage, ranges: &[(u64, u64)]) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        let mut pos = s;
        while pos < e {
            let Some(d) = storage.next_data(pos)? else {
                break;
            };
            if d >= e {
                break;
            }
            let h = storage.next_hole(d)?.min(e);
            if h <= d {
                break;
            }
            out.push((d, h));
            pos = h;
        }
    }
    Ok(out)
}

fn check_image(path: &Path, repair: bool) -> ImageCheck {
    let mut r = ImageCheck {
        path: path.to_path_buf(),
        ..Default::default()
    };
    // First look without locks: this works on an image a server has open, and sees the flags
    // as they were found (a writable open would set dirty for its own use).
    let found = crate::layer::read_header_only(path)
        .and_then(|h| Ok((h, Image::open(path, OpenOptions::inspect())?)));
    let (h, img) = match found {
        Ok(x) => x,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    r.dirty = h.has_flag(FLAG_DIRTY);
    let leaks = match data_in(img.storage().as_ref(), &img.free_ranges()) {
        Ok(l) => l,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    r.leaked_bytes = leaks.iter().map(|(s, e)| e - s).sum();
    drop(img);
    if !repair {
        if h.has_flag(FLAG_CORRUPT) {
            r.errors.push(format!("{}: marked corrupt by an earlier run; every check passes now, so `check --repair` will clear the mark", path.display()));
        }
        return r;
    }
    // Everything verified: punch the leaks, clear the corrupt mark, close cleanly (clears dirty).
    let opts = OpenOptions {
        write: true,
        lock: LockMode::Exclusive,
        allow_frozen: true,
        allow_corrupt: true,
    };
    let repaired = Image::open(path, opts).and_then(|img| {
        for &(s, e) in &leaks {
            img.storage().punch(s, e - s)?;
        }
        img.update_header(|h| h.set_flag(FLAG_CORRUPT, false))?;
        img.close()
    });
    match repaired {
        Ok(()) => r.repaired = true,
        Err(e) if e.kind() == ErrorKind::InUse => r
            .errors
            .push(format!("{e} (cannot repair an image that is open)")),
        Err(e) => r.errors.push(e.to_string()),
    }
    r
}

/// Checks `image`, and with `chain` every cowdisk layer under it plus the identity of each
/// parent (including a raw base's fingerprint).
pub fn check(image: &Path, chain: bool, repair: bool) -> CheckReport {
    let mut report = CheckReport::default();
    report.images.push(check_image(image, repair));
    if !chain || !report.images[0].errors.is_empty() {
        return report;
    }
    let verify = Chain::open(
        image,
        ChainOptions {
            inspect: true,
            verify_parents: true,
            ..Default::default()
        },
    );
    if let Err(e) = verify {
        report.images[0].errors.push(e.to_string());
        return report;
    }
    let mut child = image.to_path_buf();
    while let Ok(Some(p)) = crate::layer::read_header_only(&child).map(|h| h.parent) {
        let pp = resolve_parent_path(&child, &p);
        if p.format == ParentFormat::Raw {
            break;
        }
        let c = check_image(&pp, repair);
        let stop = !c.errors.is_empty();
        report.images.push(c);
        if stop {
            break;
        }
        child = pp;
    }
    report
}
