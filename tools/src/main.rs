//! The `cowdisk` command-line tool: thin over the library.
fn main() {}
