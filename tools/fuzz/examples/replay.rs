//! Replays inputs through a harness without libFuzzer, one per file, and reports panics:
//! `replay <image_open|image_ops|nbd_server> <file or dir>...`.
//! Handy for triage and for checking a corpus against a changed harness or library.

use cowdisk_fuzz::harness::{image_open, image_ops, nbd_server};
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
        "nbd_server" => nbd_server::run,
        _ => panic!("unknown target {target}"),
    };
    let mut failed = 0;
    for f in &files {
        let data = std::fs::read(f).expect("read input");
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed += 1;
            eprintln!("PANIC: {}", f.display());
        }
    }
    println!("{} inputs, {} panicked", files.len(), failed);
    std::process::exit(i32::from(failed > 0));
}
