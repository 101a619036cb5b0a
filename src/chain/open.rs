//! Opening a chain from its top image: following parent references, and refusing a parent
//! that is missing, changed, swapped, writable, looping or too deep (spec §3.3).

use crate::error::{err, Error, ErrorKind, Result};
use crate::format::fingerprint::raw_fingerprint;
use crate::format::header::{ParentFormat, ParentRef};
use crate::format::{FLAG_FROZEN, MAX_CHAIN_DEPTH};
use crate::layer::raw::RawImage;
use crate::layer::{format_uuid, Image, OpenOptions};
use crate::storage::LockMode;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How to open a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChainOptions {
    /// Open the top for writing (exclusive lock).
    pub writable: bool,
    /// Inspection: no locks, and no reads of a raw parent's data (its fingerprint is not
    /// verified); for `info`, `map` and `check` on images that may be in use.
    pub inspect: bool,
    /// Accept a raw parent that is a device or other special file.
    pub allow_special_parents: bool,
    /// Verify a raw parent's fingerprint even when inspecting (`check --chain` does).
    pub verify_parents: bool,
}

/// The opened layers of a chain, top first.
pub(crate) struct Opened {
    pub top: Image,
    pub lowers: Vec<Image>,
    pub base: Option<RawImage>,
}

/// Where a parent reference of the image at `child` points.
pub fn resolve_parent_path(child: &Path, parent: &ParentRef) -> PathBuf {
    let p = Path::new(OsStr::from_bytes(&parent.path));
    match child.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !p.is_absolute() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// A file's identity, (device, inode), symbolic links followed: the same file however its path
/// is spelled.
pub(crate) fn identity(path: &Path) -> Result<(u64, u64)> {
    let md = std::fs::metadata(path).map_err(|e| Error::io("stat", e).with_file(path))?;
    Ok((md.dev(), md.ino()))
}

pub(crate) fn open_chain(path: &Path, opts: ChainOptions) -> Result<Opened> {
    let top_opts = if opts.inspect {
        OpenOptions::inspect()
    } else if opts.writable {
        OpenOptions::writable()
    } else {
        OpenOptions::read_only()
    };
    let lower_opts = if opts.inspect { OpenOptions::inspect() } else { OpenOptions::read_only() };
    if opts.writable {
        // A snapshot interrupted after its decision is finished before anything else looks,
        // by a writer only (format-spec §5.7.1): a reader sees the frozen image, with the
        // same contents, and changes nothing in its directory.
        super::pending::complete_pending(path)?;
    }
    let top = Image::open(path, top_opts)?;
    let mut seen = vec![identity(path)?];
    let mut seen_remote: Vec<String> = Vec::new();
    let mut lowers: Vec<Image> = Vec::new();
    let mut base = None;
    let mut child_path = path.to_path_buf();
    let mut next = top.parent();
    while let Some(pref) = next.take() {
        if 1 + lowers.len() + 1 > MAX_CHAIN_DEPTH {
            return Err(err(ErrorKind::ChainTooDeep, format!("chain is deeper than {MAX_CHAIN_DEPTH} images"))
                .with_file(path)
                .during("open chain"));
        }
        if pref.format == ParentFormat::Remote {
            // A remote layer is named by digest, so the name is its identity: a loop would
            // need a manifest naming itself (through others), which content addressing
            // makes impossible to write; the check costs nothing and keeps the rule whole.
            let url = String::from_utf8_lossy(&pref.path).into_owned();
            if seen_remote.contains(&url) {
                return Err(err(ErrorKind::ChainLoop, format!("parent {url} is already in the chain (loop)"))
                    .with_file(&child_path)
                    .during("open parent"));
            }
            seen_remote.push(url.clone());
            match crate::remote::open_parent(&pref).map_err(|e| e.with_file(&child_path).during("open parent"))? {
                crate::remote::Opened::Layer(img) => {
                    next = img.header().parent.clone();
                    child_path = PathBuf::from(url);
                    lowers.push(*img);
                }
                crate::remote::Opened::Raw(raw) => base = Some(raw),
            }
            continue;
        }
        let ppath = resolve_parent_path(&child_path, &pref);
        let named_by = |e: Error| e.with_file(&child_path).during("open parent");
        let md = std::fs::metadata(&ppath).map_err(|e| {
            named_by(err(ErrorKind::ParentMissing, format!("parent {} is missing ({e})", ppath.display())))
        })?;
        // A directory opens (read-only) and then fails every read: reported as what it is,
        // a parent that is not there, rather than as an I/O error of the first read.
        if md.is_dir() {
            return Err(named_by(err(
                ErrorKind::ParentMissing,
                format!("parent {} is a directory, not an image", ppath.display()),
            )));
        }
        let id = (md.dev(), md.ino());
        if seen.contains(&id) {
            return Err(named_by(err(
                ErrorKind::ChainLoop,
                format!("parent {} is already in the chain (loop)", ppath.display()),
            )));
        }
        seen.push(id);
        match pref.format {
            ParentFormat::Raw => {
                let lock = if opts.inspect { LockMode::None } else { LockMode::Shared };
                let raw = RawImage::open(&ppath, opts.allow_special_parents, lock)?;
                if raw.size() != pref.size {
                    return Err(named_by(changed(
                        &ppath,
                        format!("size is {} bytes, the overlay was made on {}", raw.size(), pref.size),
                    )));
                }
                if !opts.inspect || opts.verify_parents {
                    let fp = raw_fingerprint(raw.storage().as_ref(), raw.size()).map_err(|e| e.with_file(&ppath))?;
                    if fp != pref.fingerprint {
                        return Err(named_by(changed(
                            &ppath,
                            "content fingerprint differs from the one recorded at create".into(),
                        )));
                    }
                }
                base = Some(raw);
            }
            ParentFormat::Remote => unreachable!("remote parents are opened above"),
            ParentFormat::Cowdisk => {
                let img = Image::open(&ppath, lower_opts).map_err(|e| match e.kind() {
                    ErrorKind::NotAnImage => {
                        named_by(changed(&ppath, format!("is no longer a cowdisk image: {}", e.message())))
                    }
                    _ => e,
                })?;
                let h = img.header();
                if h.uuid != pref.uuid {
                    return Err(named_by(changed(
                        &ppath,
                        format!(
                            "has UUID {}, the overlay was made on {}",
                            format_uuid(&h.uuid),
                            format_uuid(&pref.uuid)
                        ),
                    )));
                }
                if h.geometry.virtual_size != pref.size {
                    return Err(named_by(changed(
                        &ppath,
                        format!("size is {}, the overlay was made on {}", h.geometry.virtual_size, pref.size),
                    )));
                }
                if !h.has_flag(FLAG_FROZEN) {
                    return Err(named_by(changed(&ppath, "is not frozen: a writable image cannot be a parent".into())));
                }
                next = h.parent.clone();
                child_path = ppath;
                lowers.push(img);
            }
        }
    }
    Ok(Opened { top, lowers, base })
}

fn changed(p: &Path, what: String) -> Error {
    err(ErrorKind::ParentChanged, format!("parent {} changed: {what}", p.display()))
}
