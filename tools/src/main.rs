//! The `cowdisk` command-line tool: argument parsing and output, thin over the library.

mod demo;
mod serve;
mod size;

use clap::{Parser, Subcommand};
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::format::header::ParentFormat;
use cowdisk::format::{MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cowdisk",
    version,
    about = "Block-level copy-on-write disk images, served over NBD"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new empty image, standalone (--size) or as an overlay (--backing).
    Create {
        image: PathBuf,
        /// Virtual size (e.g. 10G); defaults to the parent's size.
        #[arg(long, value_parser = size::parse_size)]
        size: Option<u64>,
        /// Chunk size, a power of two from 4K to 2M (default 64K, or the parent's).
        #[arg(long, value_parser = size::parse_size)]
        chunk_size: Option<u64>,
        /// The parent: a raw file or a frozen cowdisk image.
        #[arg(long)]
        backing: Option<PathBuf>,
        /// The parent's format; probed once by magic if not given.
        #[arg(long, value_parser = ["raw", "cowdisk"])]
        backing_format: Option<String>,
    },
    /// Serve images over NBD until SIGINT or SIGTERM.
    Serve(serve::ServeArgs),
    /// Create (or reuse) a demo base with an ext4 filesystem and an overlay on it, and serve it.
    Demo(demo::DemoArgs),
}

/// A failure to report: the message (one line) and the exit code.
pub struct Failure(pub String, pub u8);

impl From<cowdisk::Error> for Failure {
    fn from(e: cowdisk::Error) -> Failure {
        Failure(e.to_string(), 1)
    }
}

pub fn chunk_shift(chunk_size: Option<u64>) -> Result<Option<u32>, Failure> {
    match chunk_size {
        None => Ok(None),
        Some(c)
            if c.is_power_of_two()
                && (MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&c.trailing_zeros()) =>
        {
            Ok(Some(c.trailing_zeros()))
        }
        Some(c) => Err(Failure(
            format!("chunk size {c} must be a power of two from 4K to 2M"),
            1,
        )),
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.cmd {
        Cmd::Create {
            image,
            size,
            chunk_size,
            backing,
            backing_format,
        } => {
            let opts = CreateOptions {
                size,
                chunk_shift: chunk_shift(chunk_size)?,
                backing,
                backing_format: backing_format.map(|f| {
                    if f == "raw" {
                        ParentFormat::Raw
                    } else {
                        ParentFormat::Cowdisk
                    }
                }),
                ..Default::default()
            };
            let img = create_image(&image, &opts)?;
            let g = img.geometry();
            img.close()?;
            println!(
                "created {} ({}, chunk size {})",
                image.display(),
                size::format_size(g.virtual_size),
                size::format_size(g.chunk_size())
            );
            Ok(())
        }
        Cmd::Serve(a) => serve::run(a),
        Cmd::Demo(a) => demo::run(a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, code)) => {
            eprintln!("cowdisk: {msg}");
            ExitCode::from(code)
        }
    }
}
