//! The facts `cowdisk info` prints about a chain, layer by layer, read from headers and maps
//! only: no data of any layer (nor of a raw base) is read.

use crate::error::Result;
use crate::format::header::ParentFormat;
use crate::format::{FLAG_CORRUPT, FLAG_DIRTY, FLAG_FROZEN};
use crate::layer::format_uuid;
use crate::{Chain, ChainOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub path: PathBuf,
    /// "cowdisk" or "raw".
    pub format: &'static str,
    pub virtual_size: u64,
    /// Chunk size (cowdisk layers only).
    pub chunk_size: Option<u64>,
    /// Whether data blocks carry checksums.
    pub data_checksums: bool,
    /// The log-structured data home (format-spec §5.10).
    pub log: bool,
    /// Bytes of data blocks the layer holds (a raw base: its length).
    pub data_bytes: u64,
    /// Bytes the file occupies on disk.
    pub disk_bytes: u64,
    pub uuid: Option<String>,
    pub flags: Vec<&'static str>,
    /// The parent reference as recorded (path as stored, and its format).
    pub parent: Option<(String, &'static str)>,
}

/// Describes the chain whose top is `image`, top first.
pub fn info(image: &Path) -> Result<Vec<LayerInfo>> {
    let chain = Chain::open(image, ChainOptions { inspect: true, ..Default::default() })?;
    let disk = |p: &Path| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
    let mut out = Vec::new();
    for img in std::iter::once(chain.top()).chain(chain.lowers().iter().map(|l| &**l)) {
        let h = img.header();
        let mut flags = Vec::new();
        for (bit, name) in [(FLAG_FROZEN, "frozen"), (FLAG_DIRTY, "dirty"), (FLAG_CORRUPT, "corrupt")] {
            if h.has_flag(bit) {
                flags.push(name);
            }
        }
        if h.pending.is_some() {
            flags.push("snapshot-pending");
        }
        out.push(LayerInfo {
            path: img.path().to_path_buf(),
            format: "cowdisk",
            virtual_size: h.geometry.virtual_size,
            chunk_size: Some(h.geometry.chunk_size()),
            data_checksums: h.geometry.data_checksums,
            log: h.geometry.log,
            data_bytes: img.data_bytes(),
            disk_bytes: disk(img.path()),
            uuid: Some(format_uuid(&h.uuid)),
            flags,
            parent: h.parent.as_ref().map(|p| {
                (
                    String::from_utf8_lossy(&p.path).into_owned(),
                    match p.format {
                        ParentFormat::Raw => "raw",
                        ParentFormat::Cowdisk => "cowdisk",
                        ParentFormat::Remote => "remote",
                    },
                )
            }),
        });
    }
    if let Some(b) = chain.base() {
        out.push(LayerInfo {
            path: b.path().to_path_buf(),
            format: "raw",
            virtual_size: b.size(),
            chunk_size: None,
            data_checksums: false,
            log: false,
            data_bytes: b.size(),
            disk_bytes: disk(b.path()),
            uuid: None,
            flags: Vec::new(),
            parent: None,
        });
    }
    Ok(out)
}
