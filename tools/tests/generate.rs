//! `cowdisk generate`: the man pages render with man and groff, without warnings, one for every
//! command `--help` lists; the bash completion script loads and completes commands and
//! options; the other shells' scripts are produced.

mod common;

use common::cli::*;
use common::*;
use std::process::Command;

/// The commands `cowdisk ARGS --help` lists (clap's own `help` aside).
fn commands(ws: &Ws, args: &[&str]) -> Vec<String> {
    let mut a = args.to_vec();
    a.push("--help");
    let help = ws.ok(&a);
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn man_pages_render_without_warnings_one_for_every_command() {
    if !require_tools(&["man", "groff"]) {
        return;
    }
    let ws = Ws::new();
    let out = ws.ok(&["generate", "man", "man/man1"]);
    // Every command and every command's commands, as --help lists them.
    let mut pages = vec!["cowdisk".to_string()];
    for c in commands(&ws, &[]) {
        pages.push(format!("cowdisk-{c}"));
        for sub in commands(&ws, &[&c]) {
            pages.push(format!("cowdisk-{c}-{sub}"));
        }
    }
    assert!(pages.contains(&"cowdisk-export-add".to_string()), "{pages:?}");
    let mut written: Vec<&str> = out.lines().collect();
    written.sort();
    let mut want: Vec<String> = pages.iter().map(|p| format!("wrote man/man1/{p}.1")).collect();
    want.sort();
    assert_eq!(written, want);
    for p in &pages {
        let file = ws.p(&format!("man/man1/{p}.1"));
        let shown = run(tool("man").env("MANWIDTH", "80").env("LANG", "C.UTF-8").arg("-l").arg(&file));
        // Words only: man justifies lines with extra spaces.
        let text = stdout_of(&shown).split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains(&format!("NAME {p} - ")), "{p}: no NAME section\n{text}");
        assert!(
            text.contains(&format!("SYNOPSIS cowdisk {}", p["cowdisk".len()..].replace('-', " ").trim())),
            "{p}: {text}"
        );
        let warned = run(tool("groff").args(["-man", "-Tutf8", "-ww", "-z"]).arg(&file));
        assert_eq!(String::from_utf8_lossy(&warned.stderr), "", "groff warns about {p}");
    }
    // The daemon's page tells how it runs as one.
    let serve =
        run(tool("man").env("MANWIDTH", "200").env("LANG", "C.UTF-8").arg("-l").arg(ws.p("man/man1/cowdisk-serve.1")));
    let text = stdout_of(&serve);
    for needle in ["--pid-file", "--fork", "Socket activation", "LISTEN_FDS", "SIGTERM"] {
        assert!(text.contains(needle), "cowdisk-serve(1) lacks {needle:?}:\n{text}");
    }
    // MANPATH-style lookup, as after installing into a man directory.
    let found = run(tool("man").env("MANPATH", ws.p("man")).args(["-w", "cowdisk-snapshot"]));
    assert_eq!(stdout_of(&found).trim(), s(&ws.p("man/man1/cowdisk-snapshot.1")));
}

/// What bash completes for the words of `line` (the last one being completed).
fn complete(script: &std::path::Path, line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split(' ').collect();
    let program = format!(
        "source {}\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE='{line}'\nCOMP_POINT=${{#COMP_LINE}}\n\
         _cowdisk cowdisk '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
        words.len() - 1,
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let out = run(Command::new("bash").args(["--norc", "-c", &program]));
    stdout_of(&out).lines().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect()
}

#[test]
fn the_bash_completion_script_loads_and_completes_commands_and_options() {
    if !require_tool("bash") {
        return;
    }
    let ws = Ws::new();
    let script = ws.p("cowdisk.bash");
    std::fs::write(&script, ws.ok(&["generate", "completions", "bash"])).unwrap();
    let loaded =
        run(Command::new("bash").args(["--norc", "-c", &format!("source {}; complete -p cowdisk", s(&script))]));
    assert_eq!(stdout_of(&loaded).trim(), "complete -o bashdefault -o default -o nosort -F _cowdisk cowdisk");
    assert_eq!(complete(&script, "cowdisk se"), ["serve"]);
    assert_eq!(complete(&script, "cowdisk serve --pi"), ["--pid-file"]);
    let mut export = complete(&script, "cowdisk export ");
    export.retain(|w| !w.starts_with('-'));
    assert_eq!(export, ["add", "remove", "list", "help"]);
    assert_eq!(complete(&script, "cowdisk generate completions z"), ["zsh"]);
}

#[test]
fn completion_scripts_for_the_other_shells_name_every_command() {
    let ws = Ws::new();
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let script = ws.ok(&["generate", "completions", shell]);
        for c in commands(&ws, &[]) {
            assert!(script.contains(&c), "{shell}: no {c}");
        }
    }
    ws.fail(&["generate", "completions", "tcsh"], &["tcsh"]);
}
