//! Replays inputs through a harness without libFuzzer, one per file, and reports panics:
//! `replay <target> <file or dir>...` (target: image_open, image_ops, image_files, nbd_server,
//! nbd_tls, nbd_multi, ops_chain).
//! Handy for triage and for checking a corpus against a changed harness or library.
//! `REPLAY_VERBOSE=1` prints each input's time (and for nbd_tls what the client saw).

use cowdisk_fuzz::harness::{image_open, image_ops, nbd_multi, nbd_server, nbd_tls, ops_chain};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().expect("usage: replay <target> <paths>...");
    let mut files: Vec<PathBuf> = Vec::new();
    for a in args {
        let p = PathBuf::from(a);
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&p).expect("read dir").map(|e| e.unwrap().path()).collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(p);
        }
    }
    let run: fn(&[u8]) = match target.as_str() {
        "image_open" => image_open::run,
        "image_ops" => image_ops::run,
        "image_files" => image_ops::run_files,
        "nbd_server" => nbd_server::run,
        "nbd_tls" => nbd_tls::run,
        "nbd_multi" => nbd_multi::run,
        "ops_chain" => ops_chain::run,
        _ => panic!("unknown target {target}"),
    };
    let verbose = std::env::var_os("REPLAY_VERBOSE").is_some();
    let mut failed = 0;
    for f in &files {
        let data = std::fs::read(f).expect("read input");
        if verbose && target == "nbd_tls" {
            eprintln!("{}: {:?}", f.display(), nbd_tls::session(&data));
            continue;
        }
        let t = std::time::Instant::now();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed += 1;
            eprintln!("PANIC: {}", f.display());
        }
        if verbose {
            eprintln!("{}: {:?}", f.display(), t.elapsed());
        }
    }
    println!("{} inputs, {} panicked", files.len(), failed);
    std::process::exit(i32::from(failed > 0));
}
