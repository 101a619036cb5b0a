//! Chains at the depth limit (format-spec §7: 256 images, counting the top and a raw base),
//! through the binary and a real client: a chain built by live snapshots while a client
//! writes, read back layer by layer through a new server, that server's memory on a deep chain
//! of a large sparse disk, and the refusal of a snapshot past the limit.

mod common;

use common::cli::*;
use common::*;

const DEPTH: usize = 256;
const BLOCK: u64 = 4096;
/// A sparse disk: a deep chain's memory must follow its data, not its size times its depth.
const SIZE: u64 = 1 << 40;

/// Where layer `k` (1 to 254) writes its own block: spread over the whole disk, past the
/// base's content.
fn own_block(k: u64) -> u64 {
    k * (SIZE / 256) + k * BLOCK
}

/// Layer `k`'s bytes for a block: its number, then the block's offset, repeated.
fn pattern(k: u64, offset: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK as usize);
    while b.len() < BLOCK as usize {
        b.extend_from_slice(&k.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }
    b
}

#[test]
fn a_chain_of_256_images_serves_every_layers_writes_and_a_snapshot_past_it_is_refused() {
    let ws = Ws::in_memory("deep");
    // A sparse 1 TiB raw base with 1 MiB of content at its start.
    let head = random_bytes(1 << 20, 0xdeeb);
    let base = std::fs::File::create(ws.p("base.raw")).expect("base");
    base.set_len(SIZE).expect("set_len");
    std::os::unix::fs::FileExt::write_all_at(&base, &head, 0).expect("write base");
    ws.create("disk.cow", &["--backing", "base.raw"]);
    let ctl = ws.p("ctl.sock");
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&ws.p("nbd.sock")), "--control", s(&ctl)]);
    let mut c = server.connect();
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");

    // Top, 254 frozen layers, the base: each frozen layer k holds its own block, and every
    // layer rewrites one shared block, so the topmost writer must win over 253 below it.
    let shared = 512 * 1024;
    let frozen = DEPTH as u64 - 2;
    for k in 1..=frozen {
        c.write(own_block(k), &pattern(k, own_block(k))).expect("write own block");
        c.write(shared, &pattern(k, shared)).expect("write shared block");
        ws.ok(&["snapshot", "disk.cow", &format!("l{k:03}.cow"), "--control", s(&ctl)]);
    }
    // The top's own write, at a block the lowest layer also wrote.
    c.write(own_block(1), &pattern(999, own_block(1))).expect("write into the top");
    c.flush().expect("flush");
    let refused = ws.fail(&["snapshot", "disk.cow", "l255.cow", "--control", s(&ctl)], &["deeper than 256"]);
    assert_no_panic(&refused);
    c.disconnect().ok();
    assert!(server.stop().success());
    assert_eq!(ws.info("disk.cow")["layers"].as_array().map(Vec::len), Some(DEPTH));

    // A new server opens the whole chain; a client sees every layer's writes where they are.
    let server = Server::start(&[s(&ws.p("disk.cow")), "--socket", s(&ws.p("nbd2.sock"))]);
    let mut c = server.connect();
    c.opt_go("disk", &[]).expect("NBD_OPT_GO");
    for k in 2..=frozen {
        let got = c.read(own_block(k), BLOCK as u32).expect("read");
        assert_bytes_eq(&got, &pattern(k, own_block(k)), &format!("layer {k}'s block, 254 - {k} layers down"));
    }
    assert_bytes_eq(&c.read(own_block(1), BLOCK as u32).expect("read"), &pattern(999, own_block(1)), "the top's block");
    assert_bytes_eq(&c.read(shared, BLOCK as u32).expect("read"), &pattern(frozen, shared), "the shared block");
    // Through every layer to the base, and past the base's content to zeros.
    assert_bytes_eq(&c.read(0, 1 << 16).expect("read"), &head[..1 << 16], "the base's head");
    assert_bytes_eq(&c.read(SIZE - BLOCK, BLOCK as u32).expect("read"), &[0u8; BLOCK as usize], "the disk's end");
    // What a deep chain of a large disk costs the server: its data, not 256 x 1 TiB of map.
    let rss = vm_kib(server.pid(), "VmRSS:");
    assert!(rss < 64 * 1024, "the server of a {DEPTH}-deep chain of a 1 TiB disk holds {rss} KiB");
    c.disconnect().ok();
    assert!(server.stop().success());
    let chk = ws.run(&["check", "--chain", "disk.cow"]);
    assert_eq!(chk.code, Some(0), "{}", chk.describe());
}
