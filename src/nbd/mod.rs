//! The NBD server: protocol encoding kept pure ([`proto`]), option haggling ([`handshake`]),
//! the request engine ([`transmission`]) and its reused buffers ([`buffers`]), and listeners and lifecycle ([`server`]).

pub mod budget;
mod buffers;
pub mod handshake;
pub mod payload;
pub mod proto;
pub mod server;
pub mod tls;
pub mod tls_pump;
pub mod transmission;

use crate::device::Disk;
use std::sync::Arc;

/// One named export: a disk and how it is described to clients.
pub struct Export {
    pub name: String,
    pub description: String,
    pub disk: Arc<dyn Disk>,
}
