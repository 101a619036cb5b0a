//! End-to-end tests of the `cowdisk` commands on damaged, cut-short and crafted images, through the built binary: `check`'s verdict and exit code on what is not a corrupted image, that a refused open writes nothing, and that a header's records cannot make a command move other files.

mod common;

use std::fs::{self, File};

use common::cli::*;
use common::nbdtest::{header_flags, header_u64, patch_header};
use common::*;

/// `check` exits 2 for a corrupted image; a path that names no file, a file that is no
/// cowdisk image, and (with `--chain`) a parent that is missing are not corrupted images but
/// errors like any other command's: exit 1, one line (before 2026-12-04 the last two exited 2,
/// "corrupt", though every image was intact). So are a FIFO and an image of a newer format
/// version (each exited 2, "corrupt", until later that day).
#[test]
fn check_of_a_missing_file_is_a_one_line_error_not_a_corrupt_verdict() {
    let ws = Ws::new();
    for args in [&["check", "missing.cow"][..], &["check", "--json", "missing.cow"]] {
        let o = ws.fail(args, &["missing.cow", "No such file"]);
        assert_eq!(o.code, Some(1), "{}", o.describe());
        assert!(!o.stdout.contains("corrupt"), "{}", o.describe());
    }
    std::fs::write(ws.p("plain.raw"), vec![7u8; 65536]).unwrap();
    let o = ws.fail(&["check", "plain.raw"], &["plain.raw", "not a cowdisk image"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    ws.create("top.cow", &["--backing", "plain.raw"]);
    std::fs::rename(ws.p("plain.raw"), ws.p("moved.raw")).unwrap();
    ws.ok(&["check", "top.cow"]);
    let o = ws.fail(&["check", "--chain", "top.cow"], &["plain.raw", "missing"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(!o.stdout.contains("corrupt"), "{}", o.describe());
    // A directory where the parent was: named as such (it used to be "Is a directory" from
    // the first read), an error like a missing parent; for `info` and `serve` alike.
    std::fs::create_dir(ws.p("plain.raw")).unwrap();
    for args in
        [&["check", "--chain", "top.cow"][..], &["info", "top.cow"], &["serve", "top.cow", "--socket", "s.sock"]]
    {
        let o = ws.fail(args, &["plain.raw is a directory, not an image"]);
        assert_eq!(o.code, Some(1), "{}", o.describe());
    }
    std::fs::remove_dir(ws.p("plain.raw")).unwrap();
    // A FIFO is refused at once (no wait for a writer), as no image.
    let fifo = std::ffi::CString::new(ws.p("pipe.cow").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let o = ws.fail(&["check", "pipe.cow"], &["pipe.cow", "FIFO"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(!o.stdout.contains("corrupt"), "{}", o.describe());
    // An image of a newer format version (both header slots say 99, checksums intact): this
    // build cannot read it, which says nothing against it.
    ws.create("newer.cow", &["--size", "1M"]);
    patch_header(&ws.p("newer.cow"), |slot| slot[8..12].copy_from_slice(&99u32.to_le_bytes()));
    let o = ws.fail(&["check", "newer.cow"], &["newer.cow", "version 99 is not supported"]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(!o.stdout.contains("corrupt"), "{}", o.describe());
}

/// An image marked CORRUPT whose journal holds records to replay (the server killed after
/// flushes): `serve` refuses it, and writes nothing to it first. Before 2026-12-04 the refused
/// open replayed the journal into the file (spec §2.2: a writer must not open it for writing).
#[test]
fn an_image_refused_for_writing_is_not_written_by_the_refusal() {
    let ws = Ws::new();
    ws.create("d.cow", &["--size", "4M"]);
    let sock = ws.p("nbd.sock");
    let mut server = Server::start(&[ws.p("d.cow").to_str().unwrap(), "--socket", sock.to_str().unwrap()]);
    let mut c = server.connect();
    c.opt_go("d", &[]).expect("NBD_OPT_GO");
    for (i, at) in [2u64 << 20, 3 << 20, 2 << 20].into_iter().enumerate() {
        c.write(at, &[0x66 + i as u8; 4096]).expect("write");
        c.flush().expect("flush");
    }
    server.kill9();
    drop(c);
    assert_ne!(header_flags(&ws.p("d.cow")) & 2, 0, "the killed server left the image clean");
    patch_header(&ws.p("d.cow"), |slot| {
        let flags = u64::from_le_bytes(slot[72..80].try_into().unwrap()) | 4;
        slot[72..80].copy_from_slice(&flags.to_le_bytes());
    });
    let before = fs::read(ws.p("d.cow")).unwrap();
    let refused = Server::try_start(&[ws.p("d.cow").to_str().unwrap(), "--socket", sock.to_str().unwrap()]);
    let log = refused.err().expect("serve of an image marked corrupt started");
    assert!(log.contains("marked corrupt"), "{log}");
    assert!(fs::read(ws.p("d.cow")).unwrap() == before, "the refused open changed the image");
    // Read-only, the journal is replayed in memory only: the flushed writes read back.
    let dev = ws.device("d.cow");
    assert_eq!(&dev[2 << 20..(2 << 20) + 4096], &[0x68; 4096][..], "the last flushed write at 2M");
    assert_eq!(&dev[3 << 20..(3 << 20) + 4096], &[0x67; 4096][..], "the flushed write at 3M");
    assert!(fs::read(ws.p("d.cow")).unwrap() == before, "reading the image changed it");
}

/// An image cut short (a copy that stopped, `truncate`): its journal area, which a writer
/// writes whole before any header lists it (spec §5.9), lies past the new end, and `check`
/// says corrupt (exit 2). Before 2026-12-04 it said "ok" while the map extents cut off with
/// the area read as empty: a block written at 32M read as zeros.
#[test]
fn an_image_cut_short_before_its_journal_area_is_corrupt() {
    let ws = Ws::new();
    ws.create("d.cow", &["--size", "64M", "--chunk-size", "4K"]);
    let sock = ws.p("nbd.sock");
    let server = Server::start(&[ws.p("d.cow").to_str().unwrap(), "--socket", sock.to_str().unwrap()]);
    let mut c = server.connect();
    c.opt_go("d", &[]).expect("NBD_OPT_GO");
    for i in 0..8u64 {
        c.write(i << 20, &[0x42; 1 << 20]).expect("write");
    }
    c.write(32 << 20, &[0x43; 4096]).expect("write at 32M");
    c.flush().expect("flush");
    drop(c);
    assert_eq!(server.stop().code(), Some(0));
    let area = header_u64(&ws.p("d.cow"), 3972);
    assert_ne!(area, 0, "the image has no journal area");
    File::options().write(true).open(ws.p("d.cow")).unwrap().set_len(area).unwrap();
    let o = ws.run(&["check", "d.cow"]);
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(o.stdout.contains("cut short") || o.stderr.contains("cut short"), "{}", o.describe());
}

/// A frozen image whose pending-snapshot record (spec §5.7.1) names as the "new overlay" a file
/// that is none (here a user's text file): nothing moves. Before 2026-12-04 even
/// `serve --read-only` hard-linked the image to the record's snapshot name and renamed the
/// text file over the image.
#[test]
fn a_pending_snapshot_record_naming_another_file_moves_nothing() {
    let ws = Ws::new();
    ws.create("hostile.cow", &["--size", "1M"]);
    fs::write(ws.p("victim.txt"), "precious user data\n").unwrap();
    let names = [(3204, &b"hostile.cow"[..]), (3460, &b"snap.cow"[..]), (3716, &b"victim.txt"[..])];
    patch_header(&ws.p("hostile.cow"), |slot| {
        let flags = u64::from_le_bytes(slot[72..80].try_into().unwrap()) | 1;
        slot[72..80].copy_from_slice(&flags.to_le_bytes());
        slot[3192..3196].copy_from_slice(&1u32.to_le_bytes());
        for (i, (at, name)) in names.iter().enumerate() {
            slot[3196 + 2 * i..3198 + 2 * i].copy_from_slice(&(name.len() as u16).to_le_bytes());
            slot[*at..*at + name.len()].copy_from_slice(name);
        }
    });
    let image = fs::read(ws.p("hostile.cow")).unwrap();
    let untouched = |what: &str| {
        assert_eq!(fs::read_to_string(ws.p("victim.txt")).unwrap(), "precious user data\n", "{what}");
        assert!(fs::read(ws.p("hostile.cow")).unwrap() == image, "{what}: the image changed");
        assert!(!ws.p("snap.cow").exists(), "{what}: the snapshot's name was taken");
    };
    // Read-only: served as the frozen image it is.
    let sock = ws.p("nbd.sock");
    let server =
        Server::start(&[ws.p("hostile.cow").to_str().unwrap(), "--read-only", "--socket", sock.to_str().unwrap()]);
    let mut c = server.connect();
    let info = c.opt_go("hostile", &[]).expect("NBD_OPT_GO");
    assert_eq!(info.size, 1 << 20);
    assert!(c.read(0, 4096).expect("read").iter().all(|&b| b == 0));
    drop(c);
    assert_eq!(server.stop().code(), Some(0));
    untouched("after serve --read-only");
    // A writer (a snapshot, which finishes a pending one first) refuses the record as corrupt.
    ws.fail(&["snapshot", "hostile.cow", "other.cow"], &["hostile.cow", "pending snapshot record"]);
    untouched("after a refused snapshot");
}
