//! `cowdisk demo`: the main job on a fresh machine. Builds (or reuses) a small raw base holding
//! an ext4 filesystem, an overlay on it, and serves the overlay with instructions to connect.

use crate::serve::serve_chains;
use crate::Failure;
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::{Chain, ChainOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo images and socket.
    #[arg(long, default_value = "cowdisk-demo")]
    pub dir: PathBuf,
    /// Also listen on TCP HOST:PORT.
    #[arg(long)]
    pub listen: Option<String>,
    /// Push the base to this repository (s3://BUCKET/PREFIX, tag demo-base) and serve an
    /// overlay that reads it lazily from there instead (needs a store: see the README).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
}

const BASE_SIZE: &str = "64M";

fn make_base(dir: &Path, base: &Path) -> Result<String, Failure> {
    let staging = dir.join("base-files");
    let _ = std::fs::remove_dir_all(&staging);
    let io = |e: std::io::Error| Failure(format!("{}: {e}", staging.display()), 1);
    std::fs::create_dir_all(staging.join("etc")).map_err(io)?;
    std::fs::write(
        staging.join("README.txt"),
        "This file lives in the read-only base image.\nChanges go to the overlay; the base never changes.\n",
    )
    .map_err(io)?;
    std::fs::write(staging.join("etc/hostname"), "cowdisk-demo\n").map_err(io)?;
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "cowdisk-demo", "-d"])
        .arg(&staging)
        .arg(base)
        .arg(BASE_SIZE)
        .output();
    let _ = std::fs::remove_dir_all(&staging);
    match mkfs {
        Ok(o) if o.status.success() => Ok("an ext4 filesystem (README.txt, etc/hostname)".into()),
        _ => {
            // No mkfs.ext4 here: a raw base of recognisable bytes still shows copy-on-write.
            let bytes: Vec<u8> = (0..64u64 << 20).map(|i| (i % 251) as u8).collect();
            std::fs::write(base, bytes).map_err(|e| Failure(format!("{}: {e}", base.display()), 1))?;
            Ok("a byte pattern (mkfs.ext4 was not available to make a filesystem)".into())
        }
    }
}

pub fn run(a: DemoArgs) -> Result<(), Failure> {
    std::fs::create_dir_all(&a.dir).map_err(|e| Failure(format!("{}: {e}", a.dir.display()), 1))?;
    let dir = a.dir.canonicalize().map_err(|e| Failure(format!("{}: {e}", a.dir.display()), 1))?;
    let base = dir.join("base.raw");
    let overlay = dir.join("overlay.cow");
    let socket = dir.join("nbd.sock");
    if !base.exists() {
        let what = make_base(&dir, &base)?;
        say!("made base {} ({BASE_SIZE}) holding {what}", base.display());
        let _ = std::fs::remove_file(&overlay);
    } else {
        say!("reusing base {}", base.display());
    }
    let (overlay, backing) = match &a.remote {
        None => (overlay, base.clone()),
        Some(url) => {
            let repo = cowdisk::remote::RepoUrl::parse(url)?;
            let opts = cowdisk::remote::push::PushOptions { tag: Some("demo-base".into()), ..Default::default() };
            let pushed = cowdisk::remote::push::push(&base, &repo, &opts, &|_, _| {})?;
            let up: u64 = pushed.iter().map(|p| p.uploaded_bytes).sum();
            say!("pushed the base to {repo}/demo-base ({} uploaded)", crate::size::format_size(up));
            (dir.join("remote-overlay.cow"), PathBuf::from(format!("{repo}/demo-base")))
        }
    };
    if !overlay.exists() {
        let o = CreateOptions { backing: Some(backing.clone()), ..Default::default() };
        create_image(&overlay, &o)?.close()?;
        say!("made overlay {} on {}", overlay.display(), backing.display());
    } else {
        say!("reusing overlay {}", overlay.display());
    }
    let chain = Chain::open(&overlay, ChainOptions { writable: true, ..Default::default() })?;
    let sock = std::os::unix::ffi::OsStrExt::as_bytes(socket.as_os_str());
    let uri = format!("nbd+unix:///overlay?socket={}", percent_encoding::percent_encode(sock, crate::serve::URI_PATH));
    say!("");
    say!("Connect with, for example:");
    say!("  nbdinfo '{uri}'");
    say!("  qemu-io -f raw -c 'read -v 0 512' '{uri}'");
    say!("  mkdir -p /tmp/cowdisk-mnt && nbdfuse /tmp/cowdisk-mnt/disk '{uri}' &");
    say!("  losetup -f --show /tmp/cowdisk-mnt/disk    # then mount the loop device");
    if a.remote.is_some() {
        say!("Chunks of the base are fetched as they are read, into the cache (cowdisk info shows the chain).");
    }
    say!("Stop with Ctrl-C; the overlay is flushed and closed cleanly.");
    say!("");
    serve_chains(vec![("overlay".into(), chain)], Some(socket), a.listen, 16, 64, std::time::Duration::from_secs(10))
}
