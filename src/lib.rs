//! cowdisk: block-level copy-on-write disk images. A sparse chunk-map image format that layers
//! writable overlays on frozen images and raw bases, the merged device over them, and an NBD
//! server that exports it.
//!
//! Layout: [`format`] (bytes on disk), [`storage`] (the I/O seam), [`layer`] (one image file),
//! [`chain`] (the merged device and copy-up), [`device`] (the traits a served disk offers),
//! [`ops`] (whole-image operations), [`live`] (chains that change under a server's clients),
//! [`nbd`] (the server), [`progress`] (the steps a long request makes, for the server's stall
//! check).

pub mod chain;
pub mod device;
pub mod error;
pub mod format;
pub mod layer;
pub mod live;
pub mod nbd;
pub mod ops;
pub mod progress;
pub mod remote;
pub mod storage;
mod sync;

pub use chain::{Chain, ChainOptions};
pub use device::{Change, Disk, DiskExtents, DiskFlush, DiskLayers, DiskRead, DiskWrite, DiskZero, Extent, ExtentKind};
pub use error::{Error, ErrorKind, Result};
