//! The exports of a running server: a list that changes while it runs (exports added and
//! removed through the control channel), each export with its open connections and I/O
//! counters.
//!
//! A connection picks its export from the list as it is when the client asks, and keeps it
//! (an `Arc`) until it ends; removing an export takes it out of the list for new clients and
//! leaves the caller to end the connections that still use it.
//!
//! Invariant: a connection enters transmission ([`Exports::enter`]) and an export is taken
//! out ([`Exports::remove`]) each under the list's lock, so a removal either sees the
//! connection counted or the connection sees the export removed: never neither.

use super::proto::{CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, MAX_STRING};
use crate::device::Disk;
use crate::error::{err, ErrorKind, Result};
use crate::sync::{read, write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// One named export: a disk, how it is described to clients, and what it has served.
pub struct Export {
    pub name: String,
    /// What NBD_OPT_LIST and NBD_INFO_DESCRIPTION tell every client; empty for none. Clients
    /// may not be the operator's: never put server paths here.
    pub description: String,
    pub disk: Arc<dyn Disk>,
    pub stats: ExportStats,
    /// Taken out of the server's list: clients still negotiating it are turned away.
    removed: AtomicBool,
}

impl Export {
    pub fn new(name: impl Into<String>, description: impl Into<String>, disk: Arc<dyn Disk>) -> Export {
        Export {
            name: name.into(),
            description: description.into(),
            disk,
            stats: ExportStats::default(),
            removed: AtomicBool::new(false),
        }
    }
}

/// Counters of one export since the server started serving it.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Connections in transmission now.
    pub connections: AtomicU64,
    /// Connections that reached transmission, ever.
    pub connections_total: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// Write-zeroes and trims.
    pub zeroes: AtomicU64,
    pub flushes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
}

impl ExportStats {
    /// Counts one answered request of type `typ` over `len` bytes.
    pub fn count(&self, typ: u16, len: u64, ok: bool) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        if !ok {
            add(&self.errors, 1);
            return;
        }
        match typ {
            CMD_READ => {
                add(&self.reads, 1);
                add(&self.bytes_read, len);
            }
            CMD_WRITE => {
                add(&self.writes, 1);
                add(&self.bytes_written, len);
            }
            CMD_TRIM | CMD_WRITE_ZEROES => add(&self.zeroes, 1),
            CMD_FLUSH => add(&self.flushes, 1),
            _ => {}
        }
    }

    /// Marks a connection entering (`true`) or leaving transmission.
    pub fn connection(&self, entering: bool) {
        if entering {
            self.connections.fetch_add(1, Ordering::Relaxed);
            self.connections_total.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Whether `name` and `description` can be an export's: NBD strings (at most 4096 bytes, no
/// NUL; a longer one would break NBD_OPT_LIST for every client), the name not empty (the
/// empty name is how a client asks for the default export).
pub fn check_strings(name: &str, description: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_STRING || name.contains('\0') {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!("an export name is 1 to {MAX_STRING} bytes without NUL, not {} bytes", name.len()),
        ));
    }
    if description.len() > MAX_STRING || description.contains('\0') {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!("a description is at most {MAX_STRING} bytes without NUL, not {} bytes", description.len()),
        ));
    }
    Ok(())
}

/// Why [`Exports::remove`] removed nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum RemoveError {
    Unknown,
    /// So many connections use it.
    InUse(u64),
}

/// The server's list of exports; names are unique.
#[derive(Default)]
pub struct Exports {
    list: RwLock<Vec<Arc<Export>>>,
}

impl Exports {
    pub fn new(exports: Vec<Export>) -> Result<Exports> {
        let e = Exports::default();
        for x in exports {
            e.add(x)?;
        }
        Ok(e)
    }

    /// Every export, in the order they were added (the first is the default export, what a
    /// client that asks for the empty name gets).
    pub fn list(&self) -> Vec<Arc<Export>> {
        read(&self.list).clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        read(&self.list).iter().find(|e| e.name == name).cloned()
    }

    pub fn is_empty(&self) -> bool {
        read(&self.list).is_empty()
    }

    /// Adds `e` at the end of the list; its name and description must pass [`check_strings`].
    pub fn add(&self, e: Export) -> Result<Arc<Export>> {
        self.add_at(usize::MAX, e)
    }

    /// Adds `e` at position `at` of the list (at its end if the list is shorter): an export
    /// put back where it was keeps its place, and with it which export is the default.
    pub fn add_at(&self, at: usize, e: Export) -> Result<Arc<Export>> {
        check_strings(&e.name, &e.description)?;
        let mut l = write(&self.list);
        if l.iter().any(|x| x.name == e.name) {
            return Err(err(ErrorKind::InvalidArgument, format!("an export named {:?} exists already", e.name)));
        }
        let e = Arc::new(e);
        let at = at.min(l.len());
        l.insert(at, e.clone());
        Ok(e)
    }

    /// A connection enters transmission on `e`: counted, unless `e` was removed meanwhile
    /// (false: not to be served, and not counted).
    pub fn enter(&self, e: &Export) -> bool {
        let _l = read(&self.list);
        if e.removed.load(Ordering::Acquire) {
            return false;
        }
        e.stats.connection(true);
        true
    }

    /// Takes `name` out of the list; new clients can no longer pick it. With `if_unused`, an
    /// export a connection uses is left where it is (its place decides the default export)
    /// and the number of its connections is the error.
    pub fn remove(&self, name: &str, if_unused: bool) -> std::result::Result<Arc<Export>, RemoveError> {
        let mut l = write(&self.list);
        let Some(i) = l.iter().position(|x| x.name == name) else {
            return Err(RemoveError::Unknown);
        };
        let users = ExportStats::get(&l[i].stats.connections);
        if if_unused && users > 0 {
            return Err(RemoveError::InUse(users));
        }
        let e = l.remove(i);
        e.removed.store(true, Ordering::Release);
        Ok(e)
    }
}
