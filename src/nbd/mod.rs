//! The NBD server: protocol encoding kept pure ([`proto`]), option haggling ([`handshake`]),
//! the request engine ([`transmission`]) and its reused buffers ([`buffers`]), request
//! payloads spliced or read from the socket ([`payload`]), TLS ([`tls`], [`tls_pump`]), the
//! socket type they all share ([`sock`]), and listeners and lifecycle ([`server`]). Every
//! dependency between these files points one way: `server` uses the rest, and `sock` uses
//! none of them. Metadata contexts (which ones an export offers, what block status says in
//! each) are [`meta`]'s.

pub mod budget;
mod buffers;
pub mod handshake;
pub mod meta;
pub mod payload;
pub mod proto;
pub mod server;
pub mod sock;
pub mod tls;
pub mod tls_pump;
pub mod transmission;

use crate::device::Disk;
use std::sync::Arc;

/// One named export: a disk and how it is described to clients.
pub struct Export {
    pub name: String,
    /// What NBD_OPT_LIST and NBD_INFO_DESCRIPTION tell every client; empty for none. Clients
    /// may not be the operator's: never put server paths here.
    pub description: String,
    pub disk: Arc<dyn Disk>,
}
