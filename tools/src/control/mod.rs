//! The control channel of a running `cowdisk serve`: where its Unix socket lives, and the
//! wire format, in the spirit of QMP: one JSON object per line each way. The server greets
//! with `{"cowdisk": {"version": V, "pid": P}}`; a request is
//! `{"execute": COMMAND, "arguments": {...}, "id": ANY}` and its reply
//! `{"return": {...}, "id": ID}` or `{"error": {"class": KIND, "desc": ONE_LINE}, "id": ID}`.
//!
//! Where: `--control PATH`, or by default `RUNDIR/server-PID.sock`, with a link
//! `RUNDIR/image-KEY.sock` to it for every image it serves, KEY being a hash of the image's
//! name (`name_of`) and another of its canonical path where that differs; so `cowdisk snapshot IMAGE ...` finds the server of IMAGE without being
//! told. RUNDIR is `$XDG_RUNTIME_DIR/cowdisk`, else `/run/cowdisk` for root, else
//! `/tmp/cowdisk-UID`; it and the sockets are the user's alone (modes 0700 and 0600).

pub mod client;
pub mod server;

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The directory the default control sockets and image links live in (made if missing).
pub fn rundir() -> std::io::Result<PathBuf> {
    // SAFETY: getuid has no failure mode.
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("cowdisk"),
        None if uid == 0 => PathBuf::from("/run/cowdisk"),
        None => std::env::temp_dir().join(format!("cowdisk-{uid}")),
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    let md = std::fs::metadata(&dir)?;
    if md.uid() != uid {
        return Err(std::io::Error::other(format!("{} belongs to another user", dir.display())));
    }
    Ok(dir)
}

/// FNV-1a of `bytes`: a short, stable key for a path (not a security boundary: the server
/// checks every request's image against what it serves).
fn key(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The canonical path of `image`: the file it names now, however spelled.
pub fn canonical(image: &Path) -> std::io::Result<PathBuf> {
    image.canonicalize()
}

/// `image` made absolute with its directory resolved but its final component kept as given:
/// the name an export's image is known by. A snapshot puts a new file under the name the
/// image was opened by (a symbolic link there is replaced by the new overlay: spec §3.3 uses
/// that path as is), so this name, unlike the canonical path, names the export's image before
/// and after any number of snapshots.
pub fn name_of(image: &Path) -> std::io::Result<PathBuf> {
    let abs = std::path::absolute(image)?;
    match (abs.parent(), abs.file_name()) {
        (Some(d), Some(n)) => Ok(d.canonicalize().map(|d| d.join(n)).unwrap_or(abs.clone())),
        _ => Ok(abs),
    }
}

/// Whether `request` names the image of an export known by `name` ([`name_of`]): by that name,
/// or by another path to the same file as it is now (a symbolic link's target, before a
/// snapshot replaces the link).
pub fn names_image(request: &Path, name: &Path) -> bool {
    if name_of(request).is_ok_and(|r| r == name) {
        return true;
    }
    matches!((canonical(request), canonical(name)), (Ok(a), Ok(b)) if a == b)
}

/// The links under which the server of the export known by `name` is found: its name's key,
/// and its canonical path's key where that differs (the CLI looks for both, see
/// `client::for_image`).
pub fn image_links(rundir: &Path, name: &Path) -> Vec<PathBuf> {
    let mut l = vec![image_link(rundir, name)];
    if let Ok(c) = canonical(name) {
        if c != name {
            l.push(image_link(rundir, &c));
        }
    }
    l
}

/// The link under which the server of the image at `image` (a name or a canonical path) can
/// be reached.
pub fn image_link(rundir: &Path, image: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    rundir.join(format!("image-{:016x}.sock", key(image.as_os_str().as_bytes())))
}

/// The default control socket of the server with process id `pid`.
pub fn server_socket(rundir: &Path, pid: u32) -> PathBuf {
    rundir.join(format!("server-{pid}.sock"))
}
