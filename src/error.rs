//! The one error type of the library: a small stable kind plus context (file, offset, operation).
//!
//! Every error that leaves the library names what it was doing and on which file, so
//! that a CLI can print it as one line and a server can map it to a protocol error code
//! by kind alone.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, coarse and stable: callers branch on this, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The operating system refused or failed an I/O call.
    Io,
    /// The file does not start with the cowdisk magic.
    NotAnImage,
    /// The file ends before a structure the header says is there.
    Truncated,
    /// A checksum does not match its bytes: of metadata, or of a data block under data
    /// checksums (an error, never data).
    BadChecksum,
    /// The image uses a format version or incompatible feature this build does not know.
    Unsupported,
    /// The metadata contradicts itself (overlapping space, out-of-range entries, ...).
    Corrupt,
    /// The parent named by an image cannot be found or opened.
    ParentMissing,
    /// The parent exists but is not the file the overlay was made on.
    ParentChanged,
    /// Following parent references comes back to an image already in the chain.
    ChainLoop,
    /// The chain has more layers than the format allows.
    ChainTooDeep,
    /// Another process holds the image open in a conflicting mode.
    InUse,
    /// A write was attempted on something opened read-only or frozen.
    ReadOnly,
    /// An offset or length falls outside the device.
    OutOfRange,
    /// A caller passed an argument that can never be valid.
    InvalidArgument,
    /// The storage is full.
    NoSpace,
    /// An operation was stopped on request before it finished (a cancelled job).
    Cancelled,
}

impl ErrorKind {
    /// A short lower-case name, stable for JSON output and tests.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::NotAnImage => "not-an-image",
            ErrorKind::Truncated => "truncated",
            ErrorKind::BadChecksum => "bad-checksum",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::ParentMissing => "parent-missing",
            ErrorKind::ParentChanged => "parent-changed",
            ErrorKind::ChainLoop => "chain-loop",
            ErrorKind::ChainTooDeep => "chain-too-deep",
            ErrorKind::InUse => "in-use",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::OutOfRange => "out-of-range",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

/// The library's error: kind, message, and where it happened.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    file: Option<PathBuf>,
    offset: Option<u64>,
    op: Option<&'static str>,
    source: Option<io::Error>,
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with a human message (lower case, no trailing period).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), file: None, offset: None, op: None, source: None }
    }

    /// Wraps an OS error; running out of room (ENOSPC, and EDQUOT and EFBIG, which tell the
    /// same to a client: nbdkit and qemu-nbd report them as ENOSPC too) becomes
    /// [`ErrorKind::NoSpace`], EWOULDBLOCK on a lock [`ErrorKind::InUse`] by the caller.
    pub fn io(op: &'static str, err: io::Error) -> Error {
        let no_space = matches!(err.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG));
        let kind = if no_space { ErrorKind::NoSpace } else { ErrorKind::Io };
        Error { kind, message: err.to_string(), file: None, offset: None, op: Some(op), source: Some(err) }
    }

    /// Attaches the file the error concerns, unless one is already attached (the innermost wins).
    pub fn with_file(mut self, file: &Path) -> Error {
        if self.file.is_none() {
            self.file = Some(file.to_path_buf());
        }
        self
    }

    /// Attaches the byte offset (in the file or device) the error concerns.
    pub fn at(mut self, offset: u64) -> Error {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// Attaches the operation that failed.
    pub fn during(mut self, op: &'static str) -> Error {
        if self.op.is_none() {
            self.op = Some(op);
        }
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// What a client of the server may be told: the step and the message, without the file
    /// (server paths are the operator's business) or the offset in it.
    pub fn for_client(&self) -> String {
        match self.op {
            Some(op) => format!("{op}: {}", self.message),
            None => self.message.clone(),
        }
    }

    /// The OS errno behind an I/O error, when there is one.
    pub fn os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(|e| e.raw_os_error())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(op) = self.op {
            write!(f, "{op}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(off) = self.offset {
            write!(f, " (at offset {off})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Shorthand constructors used across the crate; keeps call sites to one line.
pub(crate) fn err(kind: ErrorKind, message: impl Into<String>) -> Error {
    Error::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_with_file_operation_and_offset() {
        let e = err(ErrorKind::BadChecksum, "map sector checksum mismatch")
            .during("open")
            .at(8192)
            .with_file(Path::new("/tmp/a.cow"));
        let s = e.to_string();
        assert_eq!(s, "/tmp/a.cow: open: map sector checksum mismatch (at offset 8192)");
        assert!(!s.contains('\n'));
    }

    #[test]
    fn innermost_context_wins() {
        let e = err(ErrorKind::Io, "x").with_file(Path::new("inner")).with_file(Path::new("outer")).at(1).at(2);
        assert_eq!(e.file(), Some(Path::new("inner")));
        assert_eq!(e.offset(), Some(1));
    }

    #[test]
    fn enospc_maps_to_no_space_kind() {
        let e = Error::io("write", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn quota_exceeded_and_file_too_large_are_out_of_space_too() {
        for errno in [libc::EDQUOT, libc::EFBIG] {
            let e = Error::io("write", io::Error::from_raw_os_error(errno));
            assert_eq!(e.kind(), ErrorKind::NoSpace, "errno {errno}");
            assert_eq!(e.os_error(), Some(errno));
        }
        assert_eq!(Error::io("write", io::Error::from_raw_os_error(libc::EIO)).kind(), ErrorKind::Io);
    }
}
