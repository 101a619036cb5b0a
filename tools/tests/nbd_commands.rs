//! End-to-end tests of every NBD command `cowdisk serve` handles (read, write, flush, trim, write zeroes, cache, block status) in both reply modes, and of bad requests that get an error reply and leave the connection usable.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::nbdclient::*;
use common::nbdtest::*;
use common::*;

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

#[test]
fn write_with_and_without_fua_then_flush_read_back_in_both_reply_modes() {
    let fx = fixture();
    for (i, structured) in [false, true].into_iter().enumerate() {
        let mut c = client(&fx.server, "disk", structured);
        let base = (i as u64 + 1) * MIB;
        let plain = random_bytes(12345, 10 + i as u64);
        let fua = random_bytes(65536, 20 + i as u64);
        c.write(base + 7, &plain).expect("write");
        c.write_flags(base + 64 * KIB, &fua, NBD_CMD_FLAG_FUA).expect("write with FUA");
        c.flush().expect("flush");
        assert_bytes_eq(&c.read(base + 7, plain.len() as u32).unwrap(), &plain, "unaligned write");
        assert_bytes_eq(&c.read(base + 64 * KIB, fua.len() as u32).unwrap(), &fua, "FUA write");
        let around = c.read(base, 7).unwrap();
        assert!(is_zero(&around), "bytes before an unaligned write stay zero");
    }
    // Simple reply to a read: header then exactly the data.
    let mut c = simple_client(&fx.server, "disk");
    let cookie = c.next_cookie();
    c.send_request(0, NBD_CMD_READ, cookie, MIB + 7, 100, &[]).unwrap();
    match c.read_reply().expect("reply") {
        Reply::Simple { cookie: got, error: 0, data } => {
            assert_eq!(got, cookie);
            assert_bytes_eq(&data, &random_bytes(12345, 10)[..100], "simple payload");
        }
        other => panic!("expected a simple reply, got {other:?}"),
    }
}

#[test]
fn structured_read_of_unwritten_range_is_hole_chunks_and_df_gives_one_data_chunk() {
    let fx = fixture();
    let mut c = structured_client(&fx.server, "disk");
    let len = 256 * KIB as u32;

    let resp = c.command(0, NBD_CMD_READ, 0, len, &[]).expect("read");
    let holes: u64 = resp
        .chunks
        .iter()
        .map(|ch| match ch.kind {
            ChunkKind::OffsetHole { length, .. } => u64::from(length),
            _ => 0,
        })
        .sum();
    assert!(
        !resp.chunks.iter().any(|ch| matches!(ch.kind, ChunkKind::OffsetData { .. })),
        "an unwritten range needs no data chunk: {:?}",
        resp.chunks
    );
    assert_eq!(holes, u64::from(len), "holes cover the request");
    assert!(is_zero(&resp.read_data().expect("reassembled")));

    // Data in the middle: data chunk(s) for it, holes around it.
    let data = random_bytes(4096, 30);
    c.write(128 * KIB, &data).expect("write");
    let resp = c.command(0, NBD_CMD_READ, 0, len, &[]).expect("read");
    assert!(
        resp.chunks.iter().any(|ch| matches!(ch.kind, ChunkKind::OffsetHole { offset: 0, .. })),
        "leading hole: {:?}",
        resp.chunks
    );
    assert!(
        resp.chunks.iter().any(|ch| matches!(
            &ch.kind,
            ChunkKind::OffsetData { offset, data } if *offset <= 128 * KIB
                && *offset + data.len() as u64 >= 132 * KIB
        )),
        "data chunk over the written block"
    );
    let got = resp.read_data().expect("reassembled");
    assert!(is_zero(&got[..128 * KIB as usize]));
    assert_bytes_eq(&got[128 * KIB as usize..132 * KIB as usize], &data, "data");
    assert!(is_zero(&got[132 * KIB as usize..]));

    // DF: exactly one content chunk, a data chunk with the zeros present.
    let resp = c.command(NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, len, &[]).expect("DF read");
    let content: Vec<&Chunk> = resp.chunks.iter().filter(|ch| !matches!(ch.kind, ChunkKind::None)).collect();
    assert_eq!(content.len(), 1, "DF allows one content chunk: {content:?}");
    match &content[0].kind {
        ChunkKind::OffsetData { offset, data } => {
            assert_eq!(*offset, 0);
            assert_eq!(data.len(), len as usize);
        }
        other => panic!("DF read of mixed data must be one data chunk, got {other:?}"),
    }
    assert_bytes_eq(&resp.read_data().unwrap(), &got, "DF read equals fragmented read");

    // DF is refused without structured replies (it was never advertised).
    let mut s = simple_client(&fx.server, "disk");
    assert_nbd_error(
        s.command(NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, 4096, &[]).and_then(Response::check),
        NBD_EINVAL,
        "DF without structured replies",
    );
    assert_usable(&mut s, "DF without structured replies");
}

#[test]
fn reads_of_unwritten_ranges_after_large_writes_and_reads_are_zeros_in_both_reply_modes() {
    // The server reuses its payload and reply buffers across requests: a read must never
    // show bytes of an earlier request on the connection.
    let fx = fixture_with("64M", &[]);
    for (i, structured) in [false, true].into_iter().enumerate() {
        let mut c = client(&fx.server, "disk", structured);
        let data = random_bytes(MIB as usize, 40 + i as u64);
        let at = 4 * MIB + i as u64 * MIB;
        c.write(at, &data).expect("1 MiB write");
        assert_bytes_eq(&c.read(at, MIB as u32).unwrap(), &data, "1 MiB read back");
        let unwritten = 16 * MIB + i as u64 * MIB;
        for len in [MIB as u32, 4096, 100] {
            let got = if structured {
                c.command(NBD_CMD_FLAG_DF, NBD_CMD_READ, unwritten, len, &[])
                    .and_then(Response::check)
                    .and_then(|r| r.read_data())
                    .expect("DF read")
            } else {
                c.read(unwritten, len).expect("read")
            };
            assert_eq!(got.len(), len as usize);
            assert!(is_zero(&got), "{len}-byte read of an unwritten range after a 1 MiB read is all zeros");
        }
    }
}

#[test]
fn trim_makes_the_range_read_zero_and_leaves_neighbours() {
    let fx = fixture();
    let mut c = simple_client(&fx.server, "disk");
    let data = random_bytes(256 * 1024, 40);
    c.write(MIB, &data).expect("write");
    c.trim(MIB + 64 * KIB, 64 * KIB as u32).expect("trim aligned");
    c.trim(MIB + 200 * KIB + 100, 1000).expect("trim unaligned");
    let got = c.read(MIB, data.len() as u32).unwrap();
    let mut want = data.clone();
    want[64 * 1024..128 * 1024].fill(0);
    want[200 * 1024 + 100..200 * 1024 + 1100].fill(0);
    assert_bytes_eq(&got, &want, "after trims");
}

/// A client that zeroes a whole disk (qemu-img convert and nbdcopy zero their target, or its
/// holes, with fast zeroes) on an overlay over a mostly sparse raw base: only where the base
/// holds data does the overlay need to record zeros. Before 2026-12-04 it recorded a Zero
/// entry for every chunk, and zeroing 64 GiB took the server from 6 to 350 MB of memory (about
/// 3.5 GB per TiB).
#[test]
fn zeroing_a_whole_disk_over_a_sparse_base_records_zeros_only_where_the_base_has_data() {
    let dir = TempDir::for_test();
    let base = dir.join("base.raw");
    let size: u64 = 64 << 30;
    std::fs::File::create(&base).and_then(|f| f.set_len(size)).expect("make the sparse base");
    let data = random_bytes(MIB as usize, 45);
    let at = 1000 * MIB;
    std::os::unix::fs::FileExt::write_all_at(&std::fs::File::options().write(true).open(&base).unwrap(), &data, at)
        .expect("write into the base");
    let ov = create_overlay_on_raw(&dir, "ov.cow", &base);
    let server = serve(&[&ov], &dir.join("nbd.sock"), &[]);
    let mut c = simple_client(&server, "ov");
    let before = vm_kib(server.pid(), "VmRSS:");
    let step: u64 = (4 << 30) - 4096;
    let mut off = 0;
    while off < size {
        let len = step.min(size - off);
        c.write_zeroes(off, len as u32, NBD_CMD_FLAG_FAST_ZERO).expect("fast zero");
        off += len;
    }
    c.flush().unwrap();
    let grew = vm_kib(server.pid(), "VmRSS:").saturating_sub(before);
    assert!(grew < 32 << 10, "zeroing 64 GiB over a sparse base took {grew} KiB of server memory");
    assert!(is_zero(&c.read(at, MIB as u32).unwrap()), "the base's data still shows after the zeroing");
    assert!(is_zero(&c.read(at - MIB, 3 * MIB as u32).unwrap()), "around the base's data");
    drop(c);
    drop(server);
    let on_disk = std::fs::metadata(&ov).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap();
    assert!(on_disk < 16 * MIB, "the overlay takes {on_disk} bytes after the zeroing");
}

#[test]
fn write_zeroes_plain_no_hole_and_fast_zero_and_fast_zero_with_no_hole_or_partial_blocks_is_enotsup() {
    let fx = fixture();
    for structured in [false, true] {
        let mut c = client(&fx.server, "disk", structured);
        let base = if structured { 4 * MIB } else { MIB };
        let data = random_bytes(512 * 1024, 50);
        c.write(base, &data).expect("write");
        let k = |n: u64| base + n * KIB;

        c.write_zeroes(k(0), 64 * KIB as u32, 0).expect("plain");
        c.write_zeroes(k(64), 64 * KIB as u32, NBD_CMD_FLAG_NO_HOLE).expect("NO_HOLE");
        c.write_zeroes(k(128), 64 * KIB as u32, NBD_CMD_FLAG_FAST_ZERO).expect("FAST_ZERO alone is fast here");
        c.write_zeroes(k(192) + 10, 3000, NBD_CMD_FLAG_FUA).expect("FUA, unaligned");
        assert_nbd_error(
            c.write_zeroes(k(256), 64 * KIB as u32, NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE),
            NBD_ENOTSUP,
            "FAST_ZERO with NO_HOLE",
        );
        // A block only partly covered is written as data (copy-up first): not fast either.
        for (at, n, what) in [(k(256) + 512, 64 * 1024, "unaligned start"), (k(320), 5000, "unaligned end")] {
            assert_nbd_error(c.write_zeroes(at, n, NBD_CMD_FLAG_FAST_ZERO), NBD_ENOTSUP, &format!("FAST_ZERO, {what}"));
        }
        assert_usable(&mut c, "ENOTSUP");

        let mut want = data.clone();
        want[..192 * 1024].fill(0);
        want[192 * 1024 + 10..192 * 1024 + 3010].fill(0);
        assert_bytes_eq(
            &c.read(base, data.len() as u32).unwrap(),
            &want,
            "zeroed ranges read zero; the ENOTSUP ranges are untouched",
        );
    }
}

#[test]
fn cache_succeeds_and_changes_nothing() {
    let fx = fixture();
    let mut c = structured_client(&fx.server, "disk");
    let data = random_bytes(64 * 1024, 60);
    c.write(MIB, &data).expect("write");
    c.cache(MIB, 64 * KIB as u32).expect("cache written range");
    c.cache(8 * MIB, MIB as u32).expect("cache unwritten range");
    assert_bytes_eq(&c.read(MIB, data.len() as u32).unwrap(), &data, "after cache");
    assert!(is_zero(&c.read(8 * MIB, 4096).unwrap()));
    let map = status_map(&mut c, 8 * MIB, MIB);
    assert_eq!(flags_at(&map, 8 * MIB), NBD_STATE_HOLE | NBD_STATE_ZERO, "cache allocates nothing");
}

#[test]
fn block_status_reports_holes_and_zeros_for_unwritten_and_trimmed_ranges_and_data_for_written() {
    let fx = fixture();
    let mut c = structured_client(&fx.server, "disk");
    let seg = 64 * KIB;
    c.write(MIB, &random_bytes(seg as usize, 70)).expect("write data");
    c.write(2 * MIB, &random_bytes(seg as usize, 71)).expect("write");
    c.trim(2 * MIB, seg as u32).expect("trim it");
    c.write(3 * MIB, &random_bytes(seg as usize, 72)).expect("write");
    c.write_zeroes(3 * MIB, seg as u32, 0).expect("zero it");
    c.write_zeroes(4 * MIB, seg as u32, NBD_CMD_FLAG_NO_HOLE).expect("zero with NO_HOLE");

    let map = status_map(&mut c, 0, 5 * MIB);
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(flags_at(&map, 0), hz, "never written: {map:?}");
    assert_eq!(flags_at(&map, MIB - 1), hz);
    assert_eq!(flags_at(&map, MIB), 0, "written data: {map:?}");
    assert_eq!(flags_at(&map, MIB + seg - 1), 0);
    assert_eq!(flags_at(&map, MIB + seg), hz, "after the data");
    assert_eq!(flags_at(&map, 2 * MIB), hz, "trimmed: {map:?}");
    assert_ne!(flags_at(&map, 3 * MIB) & NBD_STATE_ZERO, 0, "write-zeroed reads zero: {map:?}");
    assert_eq!(flags_at(&map, 4 * MIB) & NBD_STATE_HOLE, 0, "NO_HOLE leaves no hole: {map:?}");
    // The whole export can be described, and the description covers exactly it.
    let all = status_map(&mut c, 0, DISK);
    assert_eq!(all.last().unwrap().1, DISK);
}

#[test]
fn block_status_req_one_gives_one_descriptor_and_descriptors_never_exceed_the_request() {
    let fx = fixture();
    let mut c = structured_client(&fx.server, "disk");
    c.write(MIB, &random_bytes(64 * 1024, 80)).expect("write");
    c.write(MIB + 192 * KIB, &random_bytes(4096, 81)).expect("write");

    let one = c.block_status(MIB - 4096, 8192, NBD_CMD_FLAG_REQ_ONE).expect("REQ_ONE");
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].1.len(), 1, "REQ_ONE: one descriptor: {one:?}");
    assert!(one[0].1[0].length <= 8192, "{one:?}");
    assert_eq!(one[0].1[0].flags, NBD_STATE_HOLE | NBD_STATE_ZERO);

    let one = c.block_status(MIB + 100, 1000, NBD_CMD_FLAG_REQ_ONE).expect("REQ_ONE inside data");
    assert_eq!(one[0].1, [Extent { length: 1000, flags: 0 }]);

    let one = c.block_status(0, 2 * MIB as u32, NBD_CMD_FLAG_REQ_ONE).expect("REQ_ONE over many extents");
    assert_eq!(one[0].1.len(), 1, "{one:?}");
    assert_eq!(one[0].1[0], Extent { length: MIB as u32, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });

    // Without REQ_ONE, at aligned and unaligned places, the sum never exceeds the request.
    for (offset, len) in [
        (0u64, 4 * MIB as u32),
        (MIB + 100, 1000),
        (MIB - 1, 2),
        (MIB + 60 * KIB + 1, 200 * KIB as u32),
        (MIB + 195 * KIB, 1),
        (DISK - 1, 1),
        (DISK - 300 * KIB, 300 * KIB as u32),
    ] {
        let r = c.block_status(offset, len, 0).expect("block status");
        let ext = &r[0].1;
        assert!(!ext.is_empty());
        let sum: u64 = ext.iter().map(|e| u64::from(e.length)).sum();
        assert!(sum <= u64::from(len), "[{offset}, +{len}): descriptors sum to {sum}: {ext:?}");
    }
    let exact = c.block_status(MIB - 1, 2, 0).expect("straddling");
    assert_eq!(
        exact[0].1,
        [Extent { length: 1, flags: NBD_STATE_HOLE | NBD_STATE_ZERO }, Extent { length: 1, flags: 0 }]
    );
}

#[test]
fn disc_answers_every_request_in_flight_then_closes() {
    let fx = fixture();
    for structured in [false, true] {
        let mut c = client(&fx.server, "disk", structured);
        let mut expect: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
        let mut reqs = Vec::new();
        for i in 0..16u64 {
            let cookie = c.next_cookie();
            let off = i * 256 * KIB;
            if i % 2 == 0 {
                let data = random_bytes(256 * 1024, 90 + i);
                reqs.push(Req::new(NBD_CMD_WRITE, cookie, off, data.len() as u32, data));
                expect.insert(cookie, None);
            } else {
                reqs.push(Req::new(NBD_CMD_READ, cookie, off, 256 * KIB as u32, vec![]));
                expect.insert(cookie, Some(vec![0u8; 256 * 1024]));
            }
        }
        reqs.push(Req::new(NBD_CMD_DISC, c.next_cookie(), 0, 0, vec![]));
        let sender = send_batch(&mut c, reqs);
        for _ in 0..16 {
            let r = c.read_response().expect("every request before DISC is answered");
            let want = expect.remove(&r.cookie).expect("known cookie");
            assert!(r.is_ok(), "{:?}", r.error);
            if let Some(want) = want {
                assert_bytes_eq(&r.read_data().unwrap(), &want, "read before DISC");
            }
        }
        sender.join().unwrap().expect("send the batch");
        assert_closed_within(&mut c, Duration::from_secs(5), "after DISC");
    }
    // The writes sent before DISC landed.
    let mut c = simple_client(&fx.server, "disk");
    assert_bytes_eq(&c.read(0, 256 * KIB as u32).unwrap(), &random_bytes(256 * 1024, 90), "write before DISC");
}

// ---------------------------------------------------------------------------
// Bad input: an error reply, and the connection stays usable
// ---------------------------------------------------------------------------

#[test]
fn out_of_range_requests_get_einval_or_enospc_and_change_nothing() {
    let fx = fixture();
    for structured in [false, true] {
        let mode = if structured { "structured" } else { "simple" };
        let mut c = client(&fx.server, "disk", structured);
        let what = |s: &str| format!("{mode}: {s}");

        assert_nbd_error(c.read(DISK - 512, 1024), NBD_EINVAL, &what("read past the end"));
        assert_usable(&mut c, "read past the end");
        assert_nbd_error(c.read(DISK, 1), NBD_EINVAL, &what("read at the end"));
        assert_usable(&mut c, "read at the end");
        assert_nbd_error(c.read(u64::MAX - 511, 1024), NBD_EINVAL, &what("read whose offset+length overflows"));
        assert_usable(&mut c, "overflowing read");
        assert_nbd_error(c.trim(DISK - 512, 1024), NBD_EINVAL, &what("trim past the end"));
        assert_usable(&mut c, "trim past the end");
        assert_nbd_error(c.trim(u64::MAX - 511, 1024), NBD_EINVAL, &what("trim whose offset+length overflows"));
        assert_usable(&mut c, "overflowing trim");
        assert_nbd_error(c.write(DISK - 512, &[0xaa; 1024]), NBD_ENOSPC, &what("write past the end"));
        assert_usable(&mut c, "write past the end");
        assert_nbd_error(c.write_zeroes(DISK - 512, 1024, 0), NBD_ENOSPC, &what("write zeroes past the end"));
        assert_usable(&mut c, "write zeroes past the end");
        assert_nbd_error(c.cache(DISK - 512, 1024), NBD_EINVAL, &what("cache past the end"));
        assert_usable(&mut c, "cache past the end");
        if structured {
            assert_nbd_error(c.block_status(DISK - 512, 1024, 0), NBD_EINVAL, &what("block status past the end"));
            assert_usable(&mut c, "block status past the end");
        }
        // The in-range part of the refused write was not written.
        assert!(is_zero(&c.read(DISK - 512, 512).unwrap()), "{mode}: a refused write changes nothing");
    }
}

#[test]
fn unknown_command_and_unknown_or_misplaced_flags_get_einval() {
    let fx = fixture();
    for structured in [false, true] {
        let mode = if structured { "structured" } else { "simple" };
        let mut c = client(&fx.server, "disk", structured);
        let what = |s: &str| format!("{mode}: {s}");
        for typ in [NBD_CMD_RESIZE, 9, 0x4242] {
            assert_nbd_error(
                c.command(0, typ, 0, 4096, &[]).and_then(Response::check),
                NBD_EINVAL,
                &what(&format!("unknown command {typ}")),
            );
            assert_usable(&mut c, "an unknown command");
        }
        assert_nbd_error(
            c.command(1 << 9, NBD_CMD_READ, 0, 4096, &[]).and_then(Response::check),
            NBD_EINVAL,
            &what("unknown flag on READ"),
        );
        assert_usable(&mut c, "an unknown flag");
        assert_nbd_error(
            c.command(NBD_CMD_FLAG_REQ_ONE, NBD_CMD_READ, 0, 4096, &[]).and_then(Response::check),
            NBD_EINVAL,
            &what("REQ_ONE on READ"),
        );
        assert_usable(&mut c, "a misplaced flag");
        // A refused WRITE's payload is still consumed, and nothing is written.
        assert_nbd_error(c.write_flags(MIB, &[0x55; 4096], 1 << 9), NBD_EINVAL, &what("unknown flag on WRITE"));
        assert_usable(&mut c, "a WRITE with an unknown flag");
        assert_nbd_error(
            c.write_flags(MIB, &[0x55; 4096], NBD_CMD_FLAG_NO_HOLE),
            NBD_EINVAL,
            &what("NO_HOLE on WRITE"),
        );
        assert_usable(&mut c, "a WRITE with NO_HOLE");
        assert!(is_zero(&c.read(MIB, 4096).unwrap()), "{mode}: refused writes wrote nothing");
    }
}

#[test]
fn write_payload_over_32_mib_is_drained_and_refused_with_einval() {
    let fx = fixture_with("64M", &[]);
    let mut c = simple_client(&fx.server, "disk");
    let big = vec![0x5au8; 33 << 20];
    let cookie = c.next_cookie();
    c.send_request(0, NBD_CMD_WRITE, cookie, 0, big.len() as u32, &big).expect("send 33 MiB write");
    let r = c.wait_response(cookie).expect("reply to the oversized write");
    assert_eq!(r.error, NBD_EINVAL, "{}", errno_name(r.error));
    // The payload was drained: the next request is parsed correctly, and nothing was written.
    assert!(is_zero(&assert_usable(&mut c, "an oversized write")));
    assert!(is_zero(&c.read(32 * MIB, 4096).unwrap()));

    // Reads over the maximum are refused too, without a payload: EINVAL with simple replies,
    // EOVERFLOW (the spec's "retry with smaller requests") with structured ones, with or
    // without NBD_CMD_FLAG_DF.
    assert_nbd_error(c.read(0, MAX_PAYLOAD_ADVERTISED + 4096), NBD_EINVAL, "read over 32 MiB");
    assert_usable(&mut c, "an oversized read");
    let mut st = structured_client(&fx.server, "disk");
    for flags in [0, NBD_CMD_FLAG_DF] {
        let r = st.command(flags, NBD_CMD_READ, 0, MAX_PAYLOAD_ADVERTISED + 1, &[]).expect("oversized structured read");
        assert_eq!(r.error, NBD_EOVERFLOW, "flags {flags:#x}: {}", errno_name(r.error));
    }
    assert_usable(&mut st, "an oversized structured read");

    // Exactly the maximum is fine.
    let max = random_bytes(MAX_PAYLOAD_ADVERTISED as usize, 100);
    c.write(0, &max).expect("a 32 MiB write");
    assert_bytes_eq(&c.read(0, MAX_PAYLOAD_ADVERTISED).unwrap(), &max, "32 MiB read");
}

#[test]
fn oversized_read_is_refused_at_once_while_another_client_is_in_the_middle_of_a_write() {
    let fx = fixture();
    // Client A sends a 1 MiB write but only half its payload, and stalls.
    let mut a = simple_client(&fx.server, "disk");
    let cookie = a.next_cookie();
    let data = random_bytes(MIB as usize, 130);
    let mut req = Vec::new();
    req.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&NBD_CMD_WRITE.to_be_bytes());
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&(MIB as u32).to_be_bytes());
    req.extend_from_slice(&data[..data.len() / 2]);
    a.expect_reply_for(cookie, NBD_CMD_WRITE, 0, MIB as u32);
    a.send_raw(&req).unwrap();

    // Client B's read of 4 GiB - 1 bytes must get its error now, not once A finishes.
    let mut b = simple_client(&fx.server, "disk");
    b.set_timeout(Some(Duration::from_secs(5))).unwrap();
    for structured in [false, true] {
        let mut b2 = client(&fx.server, "disk", structured);
        b2.set_timeout(Some(Duration::from_secs(5))).unwrap();
        // Past the end of the 16 MiB export: EINVAL in both modes.
        assert_nbd_error(b2.read(0, u32::MAX), NBD_EINVAL, "read of 4 GiB - 1 bytes");
        assert_usable(&mut b2, "an oversized read");
    }
    assert_nbd_error(b.read(0, u32::MAX), NBD_EINVAL, "read of 4 GiB - 1 bytes");

    // A was not disturbed: the rest of its payload completes the write.
    a.send_raw(&data[data.len() / 2..]).unwrap();
    a.wait_response(cookie).and_then(Response::check).expect("A's write");
    assert_bytes_eq(&b.read(0, MIB as u32).unwrap(), &data, "A's write landed");
}

#[test]
fn zero_length_requests_are_harmless() {
    let fx = fixture();
    for structured in [false, true] {
        let mode = if structured { "structured" } else { "simple" };
        let mut c = client(&fx.server, "disk", structured);
        let data = random_bytes(8192, 110);
        c.write(MIB, &data).expect("write");
        assert!(c.read(MIB, 0).expect("zero-length read").is_empty());
        assert!(c.read(DISK, 0).expect("zero-length read at the end").is_empty());
        c.write(MIB, &[]).expect("zero-length write");
        c.trim(MIB, 0).expect("zero-length trim");
        c.write_zeroes(MIB, 0, 0).expect("zero-length write zeroes");
        c.command(0, NBD_CMD_FLUSH, 0, 0, &[]).and_then(Response::check).expect("flush");
        c.cache(MIB, 0).expect("zero-length cache");
        assert_bytes_eq(&c.read(MIB, 8192).unwrap(), &data, &format!("{mode}: zero-length requests changed nothing"));
    }
}

#[test]
fn block_status_without_a_negotiated_context_is_einval() {
    let fx = fixture();
    // No structured replies at all.
    let mut c = simple_client(&fx.server, "disk");
    assert_nbd_error(
        c.command(0, NBD_CMD_BLOCK_STATUS, 0, 4096, &[]).and_then(Response::check),
        NBD_EINVAL,
        "block status without structured replies",
    );
    assert_usable(&mut c, "block status without structured replies");

    // Structured replies but no SET_META_CONTEXT.
    let mut c = fx.server.connect();
    c.opt_structured_reply().unwrap();
    c.opt_go("disk", &[]).unwrap();
    assert_nbd_error(c.block_status(0, 4096, 0), NBD_EINVAL, "block status without a context");
    assert_usable(&mut c, "block status without a context");

    // A context selected, but the last SET_META_CONTEXT selected nothing.
    let mut c = fx.server.connect();
    c.opt_structured_reply().unwrap();
    c.opt_set_meta_context("disk", &[BASE_ALLOCATION]).unwrap();
    c.opt_set_meta_context("disk", &["qemu:dirty-bitmap:x"]).unwrap();
    c.opt_go("disk", &[]).unwrap();
    assert_nbd_error(c.block_status(0, 4096, 0), NBD_EINVAL, "block status after SET_META_CONTEXT selected nothing");
    assert_usable(&mut c, "block status with a dropped context");
}
