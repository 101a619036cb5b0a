//! Helpers of the tests of `cowdisk serve` as a daemon (daemon.rs, watchdog.rs): the workspace they serve and the sd_notify datagrams the server sends.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use super::cli::Ws;
use super::*;

/// The virtual size of the disk of [`workspace`].
pub const SIZE: u64 = 8 << 20;

/// A workspace with `disk.cow`, an overlay on a random raw base; the base's bytes.
pub fn workspace(tag: &str) -> (Ws, Vec<u8>) {
    let ws = Ws::in_memory(tag);
    write_random_file(&ws.p("base.raw"), SIZE, 0xda);
    ws.create("disk.cow", &["--backing", "base.raw"]);
    let base = std::fs::read(ws.p("base.raw")).expect("read base.raw");
    (ws, base)
}

/// Receives one datagram on `sock` within `timeout`, as text.
pub fn notification(sock: &UnixDatagram, timeout: Duration) -> String {
    sock.set_read_timeout(Some(timeout)).expect("set a read timeout");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification from the server");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
