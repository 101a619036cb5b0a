//! The NBD server: protocol encoding kept pure ([`proto`]), option haggling ([`handshake`]),
//! the request engine ([`transmission`]) and its reused buffers ([`buffers`]), request
//! payloads spliced or read from the socket ([`payload`]), TLS ([`tls`], [`tls_pump`]), the
//! socket type they all share ([`sock`]), a connection's wind-down at shutdown
//! ([`winding`]), whether a connection's requests are stuck ([`stall`]), the listening sockets
//! ([`listener`]), and lifecycle ([`server`]). Every
//! dependency between these files points one way: `server` uses the rest, and `sock` uses
//! none of them. Metadata contexts (which ones an export offers, what block status says in
//! each) are [`meta`]'s.

pub mod budget;
mod buffers;
pub mod exports;
pub mod handshake;
mod listener;
pub mod meta;
pub mod payload;
pub mod proto;
pub mod server;
pub mod sock;
mod spin;
pub mod stall;
pub mod tls;
pub mod tls_pump;
pub mod transmission;
pub mod winding;

pub use exports::{Export, ExportStats, Exports};
