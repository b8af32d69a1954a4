//! The conventions of a command-line tool, on the real binary: shell completions and man
//! pages generated from the command line's definition (`src/completions.rs`,
//! `src/man.rs`), `--version` with the git revision (`build.rs`), and the log lines of
//! `--log-format`, `--quiet` and `-v` (`src/logging.rs`).
//!
//! The log tests need an event without root: `usernet serve --listen-stdio` with a garbled
//! frame length (0) on its stdin logs a warning when it closes that link, and keeps running
//! until SIGTERM (exit 0). Its DNS upstream is 127.0.0.1:9 and nothing asks it anything.
//! Only `run_logs_json_as_root` needs root.

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TempDir, collect_lines, require, require_tools, run_bounded, stop_group, usernet_bin};

/// `usernet ARGS`, bounded, with the logging environment cleared (the flags decide).
fn usernet(args: &[&str]) -> common::Output {
    let mut cmd = Command::new(usernet_bin());
    cmd.args(args).env_remove("RUST_LOG").env_remove("USERNET_LOG_FORMAT");
    run_bounded(&mut cmd, Duration::from_secs(30))
}

// ---------------------------------------------------------------------------
// Completions.

/// Runs `script` in bash after sourcing the completion script, which must define `_usernet`.
fn bash_with_completions(script_file: &std::path::Path, script: &str) -> common::Output {
    let full = format!("source '{}' || exit 3\n{script}", script_file.display());
    let mut cmd = Command::new("bash");
    cmd.args(["--norc", "--noprofile", "-c", &full]);
    run_bounded(&mut cmd, Duration::from_secs(30))
}

/// The words bash would offer for the command line `words` (the last one being completed).
fn bash_complete(script_file: &std::path::Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cword = words.len() - 1;
    let script = format!(
        "COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}\n\
         _usernet usernet \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$((COMP_CWORD-1))]}}\" || exit 4\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words = quoted.join(" ")
    );
    let out = bash_with_completions(script_file, &script);
    out.assert_ok();
    out.stdout.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

#[test]
fn bash_completion_is_a_valid_script_that_completes_commands_and_values() {
    require_tools(&["bash"]);
    let out = usernet(&["completions", "bash"]);
    out.assert_ok();
    let dir = TempDir::new("cli-bash");
    let file = dir.join("usernet.bash");
    std::fs::write(&file, &out.stdout).expect("write the script");
    let mut check = Command::new("bash");
    check.arg("-n").arg(&file);
    run_bounded(&mut check, Duration::from_secs(30)).assert_ok();

    assert_eq!(bash_complete(&file, &["usernet", "ru"]), ["run"]);
    let commands = bash_complete(&file, &["usernet", ""]);
    for name in ["run", "serve", "port", "completions", "man"] {
        assert!(commands.iter().any(|c| c == name), "{name} not offered: {commands:?}");
    }
    assert_eq!(bash_complete(&file, &["usernet", "run", "--log-format", ""]), ["text", "json"]);
    assert_eq!(bash_complete(&file, &["usernet", "completions", "fi"]), ["fish"]);
    assert_eq!(bash_complete(&file, &["usernet", "serve", "--listen-s"]), ["--listen-stdio"]);
}

#[test]
fn completions_for_every_shell_name_usernet() {
    for (shell, marker) in [
        ("zsh", "#compdef usernet"),
        ("fish", "complete -c usernet"),
        ("elvish", "edit:completion:arg-completer[usernet]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = usernet(&["completions", shell]);
        out.assert_ok();
        assert!(out.stdout.contains(marker), "{shell}: no {marker:?}:\n{out}");
        assert!(out.stdout.contains("log-format"), "{shell}: no --log-format:\n{out}");
    }
    let bad = usernet(&["completions", "tcsh"]);
    bad.assert_code(125);
    assert!(bad.stdout.is_empty(), "{bad}");
}

// ---------------------------------------------------------------------------
// Man pages.

/// The page of `usernet man ARGS`, checked by groff with every warning on (none allowed),
/// as plain text.
fn man_page(args: &[&str]) -> String {
    let mut man_args = vec!["man"];
    man_args.extend_from_slice(args);
    let out = usernet(&man_args);
    out.assert_ok();
    assert!(out.stdout.starts_with(".TH "), "not a man page:\n{out}");
    let dir = TempDir::new("cli-man");
    let file = dir.join("page.1");
    std::fs::write(&file, &out.stdout).expect("write the page");
    let mut groff = Command::new("groff");
    // -ww: all warnings; -P-cbou: plain text, no escapes for bold and underline.
    groff.args(["-man", "-Tutf8", "-ww", "-P-cbou"]).arg(&file);
    let rendered = run_bounded(&mut groff, Duration::from_secs(30));
    rendered.assert_ok();
    assert!(rendered.stderr.is_empty(), "groff warned about `usernet {}`:\n{rendered}", man_args.join(" "));
    // groff hyphenates and uses Unicode hyphens: compare words without them.
    rendered.stdout.replace('\u{2010}', "-").replace("-\n", "")
}

#[test]
fn man_pages_render_without_warnings_and_document_exit_statuses() {
    require_tools(&["groff"]);
    let top = man_page(&[]);
    for needle in [
        "NAME",
        "SYNOPSIS",
        "OPTIONS",
        "EXIT STATUS",
        "125",
        "126",
        "127",
        "128+N",
        "DROP-IN MODES",
        "slirp4netns",
        "pasta",
        "LOGGING",
        "ENVIRONMENT",
        "RUST_LOG",
        "USERNET_LOG_FORMAT",
        "--log-format",
        "usernet-run(1)",
        "usernet-serve(1)",
        "SEE ALSO",
    ] {
        assert!(top.contains(needle), "usernet(1) lacks {needle:?}:\n{top}");
    }
    let version = usernet(&["--version"]);
    let version = version.stdout.trim().trim_start_matches("usernet ");
    assert!(top.contains(version), "usernet(1) does not name version {version}:\n{top}");

    let run = man_page(&["run"]);
    for needle in ["usernet-run", "EXIT STATUS", "125", "126", "127", "128+N", "--publish", "COMMAND"] {
        assert!(run.contains(needle), "usernet-run(1) lacks {needle:?}:\n{run}");
    }
    for page in
        [&["serve"][..], &["port"], &["port", "ls"], &["port", "add"], &["port", "rm"], &["completions"], &["man"]]
    {
        let text = man_page(page);
        let name = format!("usernet-{}", page.join("-"));
        assert!(text.contains(&name) && text.contains("EXIT STATUS"), "{name}:\n{text}");
    }
    let unknown = usernet(&["man", "nosuch"]);
    unknown.assert_code(125);
    assert!(unknown.stderr.contains("no command `usernet nosuch`"), "{unknown}");
}

// ---------------------------------------------------------------------------
// --version.

/// `git ARGS` in the crate's directory, its output when it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(env!("CARGO_MANIFEST_DIR")).args(args);
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    out.success().then(|| out.stdout.trim().to_string())
}

/// Built in a git checkout, the version names HEAD's revision; built without one (or
/// without git), the crate's version alone: build.rs's two cases.
#[test]
fn version_names_the_git_revision_of_the_checkout() {
    let out = usernet(&["--version"]);
    out.assert_ok();
    let line = out.stdout.trim();
    let plain = format!("usernet {}", env!("CARGO_PKG_VERSION"));
    let checkout = git(&["ls-files", "--error-unmatch", "build.rs"]).is_some();
    match git(&["rev-parse", "HEAD"]).filter(|_| checkout) {
        Some(head) => {
            let rev = line
                .strip_prefix(&format!("{plain} (git "))
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{line:?} is not \"{plain} (git REV)\""));
            assert!(rev.len() >= 7 && head.starts_with(rev), "{line:?} does not name HEAD {head}");
            let short = git(&["rev-parse", "--short", "HEAD"]).expect("git rev-parse --short HEAD");
            assert!(short.starts_with(rev) || rev.starts_with(&short), "{rev} and {short}");
        }
        None => assert_eq!(line, plain),
    }
    // The drop-in modes say the same version.
    let pasta = usernet(&["pasta", "--version"]);
    assert!(pasta.stdout.contains(line.trim_start_matches("usernet ")), "{pasta}");
    let slirp = usernet(&["slirp4netns", "--version"]);
    assert!(slirp.stdout.contains(&format!("usernet: {}", line.trim_start_matches("usernet "))), "{slirp}");
}

// ---------------------------------------------------------------------------
// Logs.

/// What a `usernet serve --listen-stdio` given a garbled frame logged.
struct Served {
    code: i32,
    stderr: String,
}

/// Runs `usernet GLOBAL... serve --listen-stdio --dns-upstream 127.0.0.1:9` with `env`,
/// writes a frame length of 0 on its stdin (the link closes with a warning), waits until
/// stderr holds `until` or `wait` has passed, then stops it with SIGTERM.
fn serve_garbled(global: &[&str], env: &[(&str, &str)], until: Option<&str>, wait: Duration) -> Served {
    let mut cmd = Command::new(usernet_bin());
    cmd.args(global).args(["serve", "--listen-stdio", "--dns-upstream", "127.0.0.1:9"]);
    cmd.env_remove("RUST_LOG").env_remove("USERNET_LOG_FORMAT").envs(env.iter().copied());
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().expect("start usernet serve");
    let stderr = Arc::new(Mutex::new(String::new()));
    collect_lines(child.stderr.take().expect("piped stderr"), Arc::clone(&stderr));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(&[0, 0]).expect("write to usernet's stdin");
    let end = Instant::now() + wait;
    while Instant::now() < end {
        if until.is_some_and(|u| stderr.lock().unwrap().contains(u)) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("usernet serve exited early ({status}):\n{}", stderr.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM to its group (SIGKILL 3 s later), then the status.
    stop_group(&mut child);
    let status = child.wait().expect("wait for usernet");
    drop(stdin);
    // The collecting thread ends with the pipe; give it a moment to take the last lines.
    std::thread::sleep(Duration::from_millis(100));
    let stderr = stderr.lock().unwrap().clone();
    Served { code: status.code().unwrap_or(-1), stderr }
}

const LINK_CLOSED: &str = "link closed";

#[test]
fn json_log_lines_are_objects_with_timestamp_level_target_and_message() {
    let served = serve_garbled(&["-v", "--log-format", "json"], &[], Some(LINK_CLOSED), Duration::from_secs(10));
    assert_eq!(served.code, 0, "serve did not exit 0 on SIGTERM:\n{}", served.stderr);
    let mut levels = Vec::new();
    let mut link_fields = false;
    for line in served.stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\n{}", served.stderr));
        for key in ["timestamp", "level", "target"] {
            assert!(v[key].is_string(), "no {key} in {line}");
        }
        assert!(v["fields"]["message"].is_string(), "no message in {line}");
        levels.push((v["level"].as_str().unwrap().to_string(), v["fields"]["message"].as_str().unwrap().to_string()));
        // The event's own fields beside the message.
        link_fields |=
            v["fields"]["message"] == LINK_CLOSED && v["fields"]["link"] == "stdio" && v["fields"]["error"].is_string();
    }
    assert!(link_fields, "no link closed event with link and error fields:\n{}", served.stderr);
    assert!(levels.iter().any(|(l, m)| l == "WARN" && m.contains(LINK_CLOSED)), "{levels:?}");
    // -v: information too (the link coming up, the signal that stopped it).
    assert!(levels.iter().any(|(l, m)| l == "INFO" && m.contains("guest link up")), "{levels:?}");

    // The error that ends usernet is an event too.
    let failed = usernet(&["run", "--log-format", "json", "-p", "nosuchport", "--", "true"]);
    failed.assert_code(125);
    let lines: Vec<serde_json::Value> = failed
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(
        lines.iter().any(|v| v["level"] == "ERROR" && v["fields"]["message"].as_str().unwrap().contains("nosuchport")),
        "{failed}"
    );
}

/// Splits a `text` log line into its key=value pairs, undoing the quoting.
fn key_values(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').unwrap_or_else(|| panic!("no key=value in {line:?}"));
        assert!(!key.is_empty() && !key.contains(' '), "bad key {key:?} in {line:?}");
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i + 1,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, 't')) => value.push('\t'),
                        Some((_, 'r')) => value.push('\r'),
                        Some((_, c)) => value.push(c),
                        None => panic!("dangling escape in {line:?}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated quote in {line:?}"),
                }
            };
            (value, &quoted[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        pairs.push((key.to_string(), value));
        rest = after.strip_prefix(' ').unwrap_or(after);
        assert!(!rest.starts_with(' '), "two spaces in {line:?}");
    }
    pairs
}

#[test]
fn text_log_lines_are_key_value_pairs_in_a_fixed_order() {
    let served = serve_garbled(&[], &[], Some(LINK_CLOSED), Duration::from_secs(10));
    assert_eq!(served.code, 0, "{}", served.stderr);
    let lines: Vec<&str> = served.stderr.lines().collect();
    assert!(!lines.is_empty(), "nothing logged");
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "ANSI escape in {line:?}");
        let pairs = key_values(line);
        let keys: Vec<&str> = pairs.iter().take(4).map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["timestamp", "level", "target", "message"], "{line}");
        assert!(pairs[0].1.ends_with('Z') && pairs[0].1.contains('T'), "{line}");
        // Without -v: warnings and errors only.
        assert!(["WARN", "ERROR"].contains(&pairs[1].1.as_str()), "{line}");
    }
    // The event's own fields follow the message.
    let closed = lines.iter().map(|l| key_values(l)).find(|kv| kv[3].1 == LINK_CLOSED);
    let closed = closed.unwrap_or_else(|| panic!("no link closed event:\n{}", served.stderr));
    assert!(closed.contains(&("link".to_string(), "stdio".to_string())), "{closed:?}");
    assert!(closed.iter().any(|(k, v)| k == "error" && v.contains("garbled")), "{closed:?}");

    // USERNET_LOG_FORMAT picks the format when the flag does not.
    let by_env = serve_garbled(&[], &[("USERNET_LOG_FORMAT", "json")], Some(LINK_CLOSED), Duration::from_secs(10));
    assert!(by_env.stderr.lines().count() > 0, "nothing logged");
    for line in by_env.stderr.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    }
}

#[test]
fn quiet_keeps_only_errors_and_rust_log_still_decides() {
    // The same run without --quiet shows that the warning comes within the wait.
    let wait = Duration::from_secs(3);
    let loud = serve_garbled(&[], &[], None, wait);
    assert!(loud.stderr.contains(LINK_CLOSED), "no warning within {wait:?}:\n{}", loud.stderr);
    let quiet = serve_garbled(&["--quiet"], &[], None, wait);
    assert_eq!(quiet.code, 0, "{}", quiet.stderr);
    assert!(quiet.stderr.is_empty(), "--quiet logged:\n{}", quiet.stderr);
    let overridden = serve_garbled(&["-q"], &[("RUST_LOG", "warn")], Some(LINK_CLOSED), Duration::from_secs(10));
    assert!(overridden.stderr.contains(LINK_CLOSED), "RUST_LOG=warn did not win over -q:\n{}", overridden.stderr);

    // Errors still show.
    let failed = usernet(&["--quiet", "run", "-p", "nosuchport", "--", "true"]);
    failed.assert_code(125);
    assert!(failed.stderr.starts_with("usernet: ") && failed.stderr.contains("nosuchport"), "{failed}");
    // --quiet and --verbose contradict each other: a usage error.
    usernet(&["-q", "-v", "man"]).assert_code(125);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn run_logs_json_as_root() {
    require(&[]);
    let mut cmd = Command::new(usernet_bin());
    cmd.args(["run", "--log-format", "json", "--dns-upstream", "127.0.0.1:9", "--", "true"]);
    cmd.env("RUST_LOG", "info").env_remove("USERNET_LOG_FORMAT");
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    out.assert_ok();
    let mut messages = Vec::new();
    for line in out.stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string() && v["target"].is_string(), "{line}");
        messages.push(v["fields"]["message"].as_str().unwrap_or_else(|| panic!("no message: {line}")).to_string());
    }
    assert!(messages.iter().any(|m| m.contains("guest link up")), "{out}");
}
