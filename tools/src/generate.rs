//! `cowdisk generate`: man pages and shell completion scripts made from the command-line
//! definition itself (clap_mangen, clap_complete), so that they say what `--help` says for
//! the very binary that wrote them.

use crate::Failure;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum GenerateCmd {
    /// Write a man page for cowdisk and for each of its commands (cowdisk.1, cowdisk-serve.1,
    /// cowdisk-export-add.1, ...) into DIR, made if missing; e.g.
    /// `cowdisk generate man /usr/local/share/man/man1`.
    Man { dir: PathBuf },
    /// Print the completion script for SHELL; e.g.
    /// `cowdisk generate completions bash > /usr/share/bash-completion/completions/cowdisk`.
    Completions { shell: clap_complete::Shell },
}

pub fn run(c: GenerateCmd, cmd: clap::Command) -> Result<(), Failure> {
    match c {
        GenerateCmd::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(|e| Failure(format!("{}: {e}", dir.display()), 1))?;
            let mut cmd = cmd.disable_help_subcommand(true);
            // Built, so that each command knows its full name (cowdisk-export-add).
            cmd.build();
            man_pages(&cmd, &dir)
        }
        GenerateCmd::Completions { shell } => {
            let mut cmd = cmd;
            // Rendered in memory first: clap_complete panics on a failed write, and a reader
            // that has gone away is no reason for a backtrace.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "cowdisk", &mut script);
            let mut out = std::io::stdout().lock();
            match out.write_all(&script).and_then(|_| out.flush()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure(format!("stdout: {e}"), 1)),
                _ => Ok(()),
            }
        }
    }
}

/// The man page of `cmd` and of each of its subcommands, one file each, named after the
/// command (`cowdisk-export-add.1`).
fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<(), Failure> {
    let page = clap_mangen::Man::new(cmd.clone())
        .source(format!("cowdisk {}", env!("CARGO_PKG_VERSION")))
        .manual("cowdisk manual");
    let path = dir.join(page.get_filename());
    let mut file = std::fs::File::create(&path).map_err(|e| Failure(format!("{}: {e}", path.display()), 1))?;
    page.render(&mut file).and_then(|_| file.sync_all()).map_err(|e| Failure(format!("{}: {e}", path.display()), 1))?;
    say!("wrote {}", path.display());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir)?;
    }
    Ok(())
}
