//! The `cowdisk` command-line tool: argument parsing and output, thin over the library.

/// Prints one line on stdout. A reader that has gone away (`cowdisk map IMG | head`) ends the
/// program quietly: what it asked for has been delivered.
macro_rules! say {
    ($($t:tt)*) => {
        $crate::emit(format_args!($($t)*))
    };
}

mod control;
mod daemon;
mod demo;
mod export;
mod generate;
mod interrupt;
mod jobs;
mod ops;
mod progress;
mod remote;
mod serve;
mod size;

use clap::{CommandFactory, Parser, Subcommand};
use cowdisk::chain::create::{create_image, CreateOptions};
use cowdisk::format::header::ParentFormat;
use cowdisk::format::{MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT};
use cowdisk::ops::check::CheckOptions;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cowdisk", version, about = "Block-level copy-on-write disk images, served over NBD")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    remote: remote::RemoteArgs,
}

/// How a background job is run when a server serves the image.
#[derive(clap::Args)]
pub struct JobArgs {
    /// Most bytes per second the job moves (e.g. 50M); default unlimited.
    #[arg(long, value_parser = size::parse_size, value_name = "SIZE")]
    rate: Option<u64>,
    /// Return once the job has started instead of following it to the end.
    #[arg(long)]
    detach: bool,
    /// The serving server's control socket (default: found from IMAGE).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
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
        /// Keep a CRC-32 of every 4K data block, verified on every read (chunks up to 256K).
        /// Defaults to the cowdisk parent's setting.
        #[arg(long)]
        data_checksums: bool,
        /// Keep no data checksums, even where the cowdisk parent keeps them (which an overlay
        /// otherwise does too, and which limit chunks to 256K).
        #[arg(long, conflicts_with = "data_checksums")]
        no_data_checksums: bool,
        /// Log-structured: a FUA write of a 4K block where the image has none yet is one durable
        /// write, of a record that stays the block's home (format-spec §5.10). 8K chunks (the
        /// default with it), no data checksums; earlier versions cannot open the image.
        #[arg(long, conflicts_with = "data_checksums")]
        log: bool,
    },
    /// Freeze IMAGE's current contents as SNAPSHOT; IMAGE becomes an empty overlay on it.
    /// On an image a server serves, the server takes it while clients stay connected.
    Snapshot {
        image: PathBuf,
        snapshot: PathBuf,
        /// The serving server's control socket (default: found from IMAGE).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Make IMAGE independent of its parents (in place), or write its merged contents to --output.
    /// On an image a server serves (in place only), a background job in that server.
    Flatten {
        image: PathBuf,
        /// Write a new standalone file instead of changing IMAGE.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Format of --output.
        #[arg(long, value_parser = ["cowdisk", "raw"], default_value = "cowdisk", requires = "output")]
        format: String,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Merge IMAGE's own data into its parent (a cowdisk layer); IMAGE becomes an empty overlay.
    /// On an image a server serves, a background job in that server: IMAGE keeps what is
    /// written while it runs.
    Commit {
        image: PathBuf,
        /// Commit even though other overlays may be built on the parent.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Merge the layers under IMAGE (all its local cowdisk layers, or --layers N of them) into one
    /// new frozen layer MERGED in the same directory, and put IMAGE on it. The merged layers'
    /// files are left as they are. On an image a server serves, a background job in it.
    Compact {
        image: PathBuf,
        merged: PathBuf,
        /// How many layers under IMAGE to merge (at least 2; default all cowdisk layers).
        #[arg(long)]
        layers: Option<usize>,
        #[command(flatten)]
        job: JobArgs,
    },
    /// List the running server's background jobs, or cancel one.
    Jobs {
        #[command(subcommand)]
        cmd: Option<jobs::JobsCmd>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Show size, chunk size, allocation, flags and the whole chain.
    Info {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show which layer serves each extent of the merged device.
    Map {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show which extents of NEW may differ from OLD, a layer below NEW in its chain (a
    /// snapshot or the raw base), from the maps alone.
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify checksums and invariants. Exit 0 clean, 3 leaked space only, 2 corrupted.
    Check {
        image: PathBuf,
        /// Also check every layer under IMAGE and each parent's identity.
        #[arg(long)]
        chain: bool,
        /// Reclaim leaked space and clear the dirty flag (and a corrupt mark) once checks pass.
        #[arg(long)]
        repair: bool,
        /// Also read every data block and verify its checksum.
        #[arg(long)]
        deep: bool,
        #[arg(long)]
        json: bool,
    },
    /// Serve images over NBD until SIGINT or SIGTERM.
    #[command(after_long_help = serve::DAEMON_HELP)]
    Serve(serve::ServeArgs),
    /// Add, remove and list the exports of a running server.
    #[command(subcommand)]
    Export(export::ExportCmd),
    /// Man pages and shell completions, made from this program's own command-line definition.
    #[command(subcommand)]
    Generate(generate::GenerateCmd),
    /// Upload a frozen layer or a raw base (--chain: and the layers below it) to an S3 store.
    Push(remote::PushArgs),
    /// List the layers and tags of a repository (s3://BUCKET/PREFIX).
    Ls {
        repo: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a tag (s3://BUCKET/PREFIX/TAG) or a layer no tag or layer names
    /// (s3://BUCKET/PREFIX/layers/DIGEST).
    Rm { url: String },
    /// Delete the packs of a repository no layer references, after a grace period.
    Gc(remote::GcArgs),
    /// Fetch every chunk of the remote layers under an overlay (or of a remote layer) into the
    /// local cache.
    Pull(remote::PullArgs),
    /// The traces of remote layers: which chunks a workload read first (recorded by
    /// `serve --record-trace`, fetched first by later servers).
    #[command(subcommand)]
    Trace(remote::TraceCmd),
    /// Create (or reuse) a demo base with an ext4 filesystem and an overlay on it, and serve it.
    Demo(demo::DemoArgs),
}

pub fn emit(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("cowdisk: stdout: {e}");
        std::process::exit(1);
    }
}

/// A failure to report: the message (one line) and the exit code.
pub struct Failure(pub String, pub u8);

impl From<cowdisk::Error> for Failure {
    fn from(e: cowdisk::Error) -> Failure {
        Failure(e.to_string(), 1)
    }
}

/// The chunk shift for `--chunk-size` of the image at `image`.
pub fn chunk_shift(image: &std::path::Path, chunk_size: Option<u64>) -> Result<Option<u32>, Failure> {
    match chunk_size {
        None => Ok(None),
        Some(c) if c.is_power_of_two() && (MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&c.trailing_zeros()) => {
            Ok(Some(c.trailing_zeros()))
        }
        Some(c) => Err(Failure(
            format!(
                "{}: create: chunk size {} is not a power of two from 4K to 2M",
                image.display(),
                size::format_size(c)
            ),
            1,
        )),
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    cli.remote.apply()?;
    match cli.cmd {
        Cmd::Create { image, size, chunk_size, backing, backing_format, data_checksums, no_data_checksums, log } => {
            let format = backing_format.map(|f| if f == "raw" { ParentFormat::Raw } else { ParentFormat::Cowdisk });
            let opts = CreateOptions {
                size,
                chunk_shift: chunk_shift(&image, chunk_size)?,
                backing,
                backing_format: format,
                data_checksums: if no_data_checksums { Some(false) } else { data_checksums.then_some(true) },
                log,
                ..Default::default()
            };
            ops::sweep_temps(&image, "create");
            let img = create_image(&image, &opts)?;
            let g = img.geometry();
            img.close()?;
            say!(
                "created {} ({}, chunk size {})",
                image.display(),
                size::format_size(g.virtual_size),
                size::format_size(g.chunk_size())
            );
            Ok(())
        }
        Cmd::Snapshot { image, snapshot, control } => ops::snapshot_cmd(&image, &snapshot, control.as_deref()),
        Cmd::Flatten { image, output, format, job } => ops::flatten_cmd(&image, output, &format, &job),
        Cmd::Commit { image, force, job } => ops::commit_cmd(&image, force, &job),
        Cmd::Compact { image, merged, layers, job } => ops::compact_cmd(&image, &merged, layers, &job),
        Cmd::Jobs { cmd: Some(c), .. } => jobs::run(c),
        Cmd::Jobs { cmd: None, json, control } => jobs::list(json, control.as_deref()),
        Cmd::Info { image, json } => ops::info_cmd(&image, json),
        Cmd::Map { image, json } => ops::map_cmd(&image, json),
        Cmd::Diff { old, new, json } => ops::diff_cmd(&old, &new, json),
        Cmd::Check { image, chain, repair, deep, json } => {
            ops::check_cmd(&image, CheckOptions { chain, repair, deep }, json)
        }
        Cmd::Serve(a) => serve::run(a),
        Cmd::Export(c) => export::run(c),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Push(a) => remote::push_cmd(a),
        Cmd::Ls { repo, json } => remote::ls_cmd(&repo, json),
        Cmd::Rm { url } => remote::rm_cmd(&url),
        Cmd::Gc(a) => remote::gc_cmd(a),
        Cmd::Pull(a) => remote::pull_cmd(a),
        Cmd::Trace(c) => remote::trace_cmd(c),
        Cmd::Generate(c) => generate::run(c, Cli::command()),
    }
}

/// A usage error as one line (clap's own rendering spans several, with a usage block): what
/// was wrong, any tip, and where to look; exit 1, as qemu-img's usage errors (clap's 2 is
/// `check`'s "corrupted": a mistyped option must not read as a damaged image; until
/// 2026-12-04 it did, found by a review). Help and version requests print as clap makes
/// them; help shown for a missing subcommand exits 1 too.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => e.exit(),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(1);
        }
        _ => {}
    }
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect();
    let mut line = String::new();
    for p in parts {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(p);
    }
    eprintln!("cowdisk: {line} (see 'cowdisk --help')");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    let result = run(cli);
    // Chunks fetched in the last moments are kept for the next process (a failure here only
    // costs that process a fetch).
    let _ = cowdisk::remote::publish_cache();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, code)) => {
            if !msg.is_empty() {
                eprintln!("cowdisk: {msg}");
            }
            ExitCode::from(code)
        }
    }
}
