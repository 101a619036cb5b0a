//! Creating images: standalone, or as an overlay that records who its parent is (format,
//! path, identity) so that the parent is never probed again and never silently swapped.

use crate::error::{err, Error, ErrorKind, Result};
use crate::format::fingerprint::raw_fingerprint;
use crate::format::header::{ParentFormat, ParentRef};
use crate::format::{Geometry, DEFAULT_CHUNK_SHIFT, FLAG_FROZEN, MAGIC, MAX_PARENT_PATH, SIZE_ALIGN};
use crate::layer::raw::RawImage;
use crate::layer::{Image, OpenOptions};
use crate::storage::namespace::{dir_of, publish_new, temp_name, Namespace, RealFs};
use crate::storage::LockMode;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size; defaults to the parent's size.
    pub size: Option<u64>,
    /// log2 of the chunk size; defaults to the parent's (cowdisk) or 64 KiB.
    pub chunk_shift: Option<u32>,
    pub backing: Option<PathBuf>,
    /// The parent's format; probed once (by magic) when not given.
    pub backing_format: Option<ParentFormat>,
    /// Record the parent's absolute path instead of a path relative to the new image's directory.
    pub absolute_parent_path: bool,
    /// Accept a raw parent that is a device or another special file.
    pub allow_special_parent: bool,
    /// Per-block data checksums (chunks of at most 256 KiB); defaults to the cowdisk parent's
    /// setting, or off.
    pub data_checksums: Option<bool>,
    /// The log-structured data home of format-spec §5.10 (8 KiB chunks, the default with it).
    pub log: bool,
}

/// Guesses a parent's format: cowdisk if it starts with the magic, raw otherwise.
pub fn probe_format(path: &Path) -> Result<ParentFormat> {
    // Opened as images are (a FIFO is refused there rather than waited on forever).
    let s = crate::storage::FileStorage::open(path, false, crate::storage::LockMode::None)?;
    let mut f = s.file();
    let mut m = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match f.read(&mut m[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(Error::io("read", e).with_file(path)),
        }
    }
    Ok(if got == 8 && m == MAGIC { ParentFormat::Cowdisk } else { ParentFormat::Raw })
}

/// Creates an image at `path` (which must not exist) and returns it open for writing.
/// The file appears under its name only once complete (written under a temporary name, synced,
/// renamed without replacing anything).
pub fn create_image(path: &Path, opts: &CreateOptions) -> Result<Image> {
    if path.symlink_metadata().is_ok() {
        return Err(err(ErrorKind::InvalidArgument, "already exists").with_file(path).during("create"));
    }
    let (parent, parent_size, parent_shift, parent_sums) = match &opts.backing {
        None => (None, None, None, false),
        Some(b) => {
            let (r, size, shift, sums) = parent_ref(path, b, opts)?;
            (Some(r), Some(size), shift, sums)
        }
    };
    let size = match (opts.size, parent_size) {
        (Some(s), _) => s,
        (None, Some(p)) => p.next_multiple_of(SIZE_ALIGN),
        (None, None) => {
            return Err(err(ErrorKind::InvalidArgument, "a size is needed for an image without a parent")
                .with_file(path)
                .during("create"))
        }
    };
    let shift = match opts.log {
        true => opts.chunk_shift.unwrap_or(crate::format::LOG_CHUNK_SHIFT),
        false => opts.chunk_shift.or(parent_shift).unwrap_or(DEFAULT_CHUNK_SHIFT),
    };
    // A log-structured image keeps no checksums, whatever its parent does.
    let sums = opts.data_checksums.unwrap_or(parent_sums && !opts.log);
    let geom = Geometry::new(size, shift)
        .and_then(|g| g.with_data_checksums(sums))
        .and_then(|g| g.with_log(opts.log))
        .map_err(|e| e.with_file(path).during("create"))?;
    create_file_in(&RealFs, path, geom, parent)?;
    Image::open(path, OpenOptions::writable())
}

/// Writes a new, closed image at `path` through `ns`: built and synced under a temporary name,
/// then renamed to `path` without replacing anything. A crash leaves either no file at `path`
/// or the complete image (and perhaps a stale temporary file, see [`sweep_stale_temps`]).
///
/// [`sweep_stale_temps`]: crate::storage::namespace::sweep_stale_temps
pub fn create_file_in(ns: &dyn Namespace, path: &Path, geom: Geometry, parent: Option<ParentRef>) -> Result<()> {
    let tmp = temp_name(path, "create");
    let storage = ns.create(&tmp).map_err(|e| e.during("create"))?;
    let done = Image::create_closed_on(storage.as_ref(), &tmp, geom, parent)
        .and_then(|()| publish_new(ns, &tmp, path))
        .map_err(|e| e.during("create"));
    if done.is_err() {
        ns.remove(&tmp);
    }
    // The temporary file stays locked (by `storage`) until it has its final name.
    drop(storage);
    done
}

/// The parent reference for an overlay at `child` on `parent`, with the parent's size, chunk
/// shift and whether it carries data checksums.
fn parent_ref(child: &Path, parent: &Path, opts: &CreateOptions) -> Result<(ParentRef, u64, Option<u32>, bool)> {
    let ctx = |e: Error| e.with_file(parent).during("create overlay");
    if crate::remote::is_remote(parent.as_os_str().as_encoded_bytes()) {
        return remote_parent_ref(parent).map_err(ctx);
    }
    let format = match opts.backing_format {
        Some(f) => f,
        None => probe_format(parent)?,
    };
    let stored = stored_parent_path(child, parent, opts.absolute_parent_path)?;
    match format {
        ParentFormat::Cowdisk => {
            let p = Image::open(parent, OpenOptions::read_only())?;
            let h = p.header();
            if !h.has_flag(FLAG_FROZEN) {
                return Err(ctx(err(
                    ErrorKind::InvalidArgument,
                    "is a writable image and cannot be a parent; freeze it first with `cowdisk snapshot`",
                )));
            }
            Ok((
                ParentRef { format, path: stored, uuid: h.uuid, size: h.geometry.virtual_size, fingerprint: 0 },
                h.geometry.virtual_size,
                Some(h.geometry.chunk_shift),
                h.geometry.data_checksums,
            ))
        }
        ParentFormat::Raw => {
            let raw = RawImage::open(parent, opts.allow_special_parent, LockMode::Shared)?;
            if raw.size() == 0 {
                return Err(ctx(err(ErrorKind::InvalidArgument, "is empty and cannot be a parent")));
            }
            let fingerprint = raw_fingerprint(raw.storage().as_ref(), raw.size()).map_err(ctx)?;
            Ok((
                ParentRef { format, path: stored, uuid: [0; 16], size: raw.size(), fingerprint },
                raw.size(),
                None,
                false,
            ))
        }
        ParentFormat::Remote => remote_parent_ref(parent).map_err(ctx),
    }
}

/// The parent reference for an overlay on a remote layer (spec §9.1): a tag is resolved to
/// the digest it names now, since a parent reference must not move.
fn remote_parent_ref(parent: &Path) -> Result<(ParentRef, u64, Option<u32>, bool)> {
    use crate::remote::{manifest::LayerKind, LayerUrl};
    let url = LayerUrl::parse(&parent.to_string_lossy())?;
    let digest = crate::remote::resolve(&url)?;
    let m = crate::remote::fetch_manifest(&url.repo, &digest)?;
    let path = url.repo.layer_url(&digest);
    // The manifest may have come from this host's cache, which knows layers by digest alone:
    // the repository named must hold the layer now (it may have been removed, or never been
    // there), or the overlay would stand on nothing and its first read of it fail.
    let key = format!("layers/{}", crate::remote::manifest::hex(&digest));
    if !crate::remote::store(&url.repo)?.exists(&key)? {
        return Err(err(ErrorKind::ParentMissing, format!("{path}: no such layer")));
    }
    let path = path.into_bytes();
    if path.len() > MAX_PARENT_PATH {
        return Err(err(ErrorKind::InvalidArgument, format!("the layer URL is longer than {MAX_PARENT_PATH} bytes")));
    }
    let shift = (m.kind == LayerKind::Cowdisk).then_some(m.chunk_shift);
    let pref = ParentRef { format: ParentFormat::Remote, path, uuid: m.uuid, size: m.virtual_size, fingerprint: 0 };
    Ok((pref, m.virtual_size, shift, false))
}

/// The bytes recorded as the parent's path: relative to the child's directory, or absolute.
pub fn stored_parent_path(child: &Path, parent: &Path, absolute: bool) -> Result<Vec<u8>> {
    let p = if absolute {
        parent.canonicalize().map_err(|e| Error::io("resolve", e).with_file(parent))?
    } else {
        let child_dir = dir_of(child);
        let cd = child_dir.canonicalize().map_err(|e| Error::io("resolve", e).with_file(&child_dir))?;
        let pp = parent.canonicalize().map_err(|e| Error::io("resolve", e).with_file(parent))?;
        relative_path(&cd, &pp)
    };
    let bytes = p.into_os_string().into_vec();
    if bytes.len() > MAX_PARENT_PATH {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!("parent path is {} bytes; the format holds at most {MAX_PARENT_PATH}", bytes.len()),
        )
        .with_file(parent));
    }
    Ok(bytes)
}

/// The path that leads from directory `from` to `to` (both absolute, canonical).
pub fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_path_climbs_to_the_common_ancestor() {
        assert_eq!(relative_path(Path::new("/a/b/c"), Path::new("/a/d/e.img")), PathBuf::from("../../d/e.img"));
        assert_eq!(relative_path(Path::new("/a"), Path::new("/a/x.img")), PathBuf::from("x.img"));
    }
}
