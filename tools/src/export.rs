//! `cowdisk export add|remove|list`: the exports of a running server, changed through its
//! control channel without restarting it or disturbing its other exports.

use crate::control::client::{absolute, server};
use crate::Failure;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum ExportCmd {
    /// Serve IMAGE as a new export of the running server.
    Add {
        image: PathBuf,
        /// Export name (default: the file's name without extension).
        #[arg(long)]
        name: Option<String>,
        /// Export it read-only.
        #[arg(long)]
        read_only: bool,
        /// What clients see as the export's description.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// The server's control socket (default: the one server running for you).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Stop serving export NAME; refused while clients are connected, unless --force.
    Remove {
        name: String,
        /// Disconnect its clients (after their requests in flight are answered).
        #[arg(long)]
        force: bool,
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// List the exports with their connections and I/O counters.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

pub fn run(cmd: ExportCmd) -> Result<(), Failure> {
    match cmd {
        ExportCmd::Add { image, name, read_only, description, control } => {
            let mut c = server(control.as_deref())?;
            let args =
                json!({"image": absolute(&image)?, "name": name, "read_only": read_only, "description": description});
            let r = c.call("export-add", args)?;
            let name = r.get("name").and_then(Value::as_str).unwrap_or("");
            say!("serving {} as export {name}{}", image.display(), if read_only { " (read-only)" } else { "" });
        }
        ExportCmd::Remove { name, force, control } => {
            server(control.as_deref())?.call("export-remove", json!({"name": name, "force": force}))?;
            say!("export {name} removed");
        }
        ExportCmd::List { json, control } => {
            let list = server(control.as_deref())?.call("export-list", json!({}))?;
            if json {
                say!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
                return Ok(());
            }
            let rows = list.as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                say!("no exports");
            }
            let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            for e in &rows {
                say!(
                    "{} {}{}: {} connected ({} in all), {} reads ({} bytes), {} writes ({} bytes), {} zeroes, {} flushes, {} errors",
                    e.get("name").and_then(Value::as_str).unwrap_or(""),
                    e.get("image").and_then(Value::as_str).unwrap_or("-"),
                    if e.get("read_only").and_then(Value::as_bool).unwrap_or(false) { " (read-only)" } else { "" },
                    n(e, "connections"),
                    n(e, "connections_total"),
                    n(e, "reads"),
                    n(e, "bytes_read"),
                    n(e, "writes"),
                    n(e, "bytes_written"),
                    n(e, "zeroes"),
                    n(e, "flushes"),
                    n(e, "errors"),
                );
            }
        }
    }
    Ok(())
}
