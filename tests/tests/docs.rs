//! The documentation's examples, run: every ```` ```console ```` block of
//! README.md and docs/*.md is executed, in order, one shell session per
//! file, and what it prints is compared with what the block shows. A claim
//! that stops being true fails here, not in a reader's terminal.
//!
//! In a block, `$ ` starts a command (a line ending in `\` continues it, as
//! do the lines after it that start with `> `, and a heredoc runs to its end
//! marker); the lines after it, up to the next command, are its output
//! (compared without the CR of a CRLF). An output line `...` stands for any number of
//! lines, and `[..]` inside a line for any text. A command must exit 0.
//! ```` ```toml file=NAME ```` (any language) writes the block to `NAME` in
//! the session's directory before the commands that follow it.
//!
//! Each session runs with the debug binaries first on `PATH`, in a fresh
//! directory, inside network, PID and mount namespaces of its own
//! (`unshare`): the examples may use the default ports (8500, 8502, 8600…)
//! without meeting anything else on the machine, and everything they start
//! in the background ends with the session.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// One step of a session, in document order.
#[derive(Debug)]
enum Step {
    /// A file written before the commands after it.
    File {
        name: String,
        text: String,
    },
    Command(Example),
}

#[derive(Debug)]
struct Example {
    /// Where it is (`README.md:42`), for failures.
    at: String,
    command: String,
    expected: Vec<String>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The steps of one Markdown file.
fn parse(path: &Path) -> Result<Vec<Step>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let name = path
        .strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string();
    let lines: Vec<&str> = text.lines().collect();
    let mut steps = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].trim_start().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let info = info.trim().to_owned();
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && lines[end].trim_start() != "```" {
            end += 1;
        }
        if end == lines.len() {
            bail!("{name}:{}: a code block is not closed", i + 1);
        }
        let body = &lines[start..end];
        if let Some(file) = info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("file="))
        {
            steps.push(Step::File {
                name: file.to_owned(),
                text: body.join("\n") + "\n",
            });
        } else if info == "console" {
            steps.extend(commands(&name, start, body)?.into_iter().map(Step::Command));
        }
        i = end + 1;
    }
    Ok(steps)
}

/// The commands of a console block starting at line `first` (0-based).
fn commands(name: &str, first: usize, body: &[&str]) -> Result<Vec<Example>> {
    let mut out: Vec<Example> = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let line = body[i];
        let Some(command) = line.strip_prefix("$ ") else {
            match out.last_mut() {
                Some(example) => example.expected.push(line.to_owned()),
                None => bail!(
                    "{name}:{}: output before any command in a console block",
                    first + i + 1
                ),
            }
            i += 1;
            continue;
        };
        let at = format!("{name}:{}", first + i + 1);
        let mut command = command.to_owned();
        // A heredoc runs to its marker; a trailing backslash continues.
        let marker = command
            .split("<<")
            .nth(1)
            .map(|m| m.trim().trim_matches(['\'', '"', '-']).to_owned())
            .filter(|m| !m.is_empty());
        i += 1;
        if let Some(marker) = marker {
            loop {
                let Some(next) = body.get(i) else {
                    bail!("{at}: heredoc without its {marker} line");
                };
                command.push('\n');
                command.push_str(next);
                i += 1;
                if next.trim() == marker {
                    break;
                }
            }
        }
        while command.ends_with('\\') {
            let Some(next) = body.get(i) else {
                bail!("{at}: a continued command ends the block");
            };
            command.push('\n');
            command.push_str(next);
            i += 1;
        }
        // `> ` lines continue it too (the shell's second prompt).
        while let Some(next) = body.get(i).and_then(|l| l.strip_prefix("> ")) {
            command.push('\n');
            command.push_str(next);
            i += 1;
        }
        out.push(Example {
            at,
            command,
            expected: Vec::new(),
        });
    }
    Ok(out)
}

/// `line` matches `pattern`, where `[..]` stands for any text.
fn line_matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("[..]").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let Some(mut rest) = line.strip_prefix(parts[0]) else {
        return false;
    };
    for (k, part) in parts.iter().enumerate().skip(1) {
        if k == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// `actual` matches `expected`, where a `...` line stands for any lines.
fn lines_match(expected: &[String], actual: &[&str]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first == "..." => {
            (0..=actual.len()).any(|skip| lines_match(rest, &actual[skip..]))
        }
        Some((first, rest)) => actual
            .split_first()
            .is_some_and(|(line, more)| line_matches(first, line) && lines_match(rest, more)),
    }
}

/// The session as one bash script: each command between markers that
/// carry its exit status.
fn script(steps: &[Step]) -> String {
    let mut out = String::from("exec 2>&1\nip link set lo up\n");
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::File { name, text } => {
                out.push_str(&format!(
                    "cat > '{name}' <<'__MESHWORK_DOC_FILE__'\n{text}__MESHWORK_DOC_FILE__\n"
                ));
            }
            Step::Command(example) => {
                out.push_str(&format!("printf '\\n@@doc-begin {n}@@\\n'\n"));
                out.push_str(&example.command);
                out.push_str(&format!("\nprintf '\\n@@doc-end {n} %d@@\\n' $?\n"));
            }
        }
    }
    out
}

/// Runs the examples of one file; every mismatch is reported at once.
fn run_file(relative: &str) -> Result<()> {
    let path = repo().join(relative);
    let steps = parse(&path)?;
    let examples = steps
        .iter()
        .filter(|s| matches!(s, Step::Command(_)))
        .count();
    if examples == 0 {
        return Ok(());
    }
    if !meshwork_tests::host::is_root() || which("unshare").is_none() {
        if std::env::var_os("CI").is_some() {
            bail!("{relative}: the examples need root and unshare, which CI has");
        }
        eprintln!("skipped {relative}: the examples run as root, in namespaces of their own");
        return Ok(());
    }
    let registry = meshwork_tests::registry_bin();
    let bin_dir = registry.parent().context("binary dir")?.to_owned();
    let work = tempfile::tempdir()?;
    std::fs::write(work.path().join("session.sh"), script(&steps))?;
    let path_var = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // PID namespace: when the session's shell ends, whatever it left
    // running is killed with it.
    let output = Command::new("timeout")
        .args(["-k", "5", "180", "unshare", "--net", "--pid", "--fork"])
        .args(["--mount-proc", "--kill-child", "bash", "session.sh"])
        .current_dir(work.path())
        .env("PATH", path_var)
        .env("NO_COLOR", "1")
        .output()
        .context("run unshare")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut failures = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let Step::Command(example) = step else {
            continue;
        };
        let begin = format!("@@doc-begin {n}@@\n");
        let Some(from) = text.find(&begin).map(|at| at + begin.len()) else {
            failures.push(format!("{}: never ran (`{}`)", example.at, example.command));
            break;
        };
        let end = format!("\n@@doc-end {n} ");
        let Some(to) = text[from..].find(&end).map(|at| from + at) else {
            failures.push(format!(
                "{}: did not finish (`{}`):\n{}",
                example.at,
                example.command,
                &text[from..]
            ));
            break;
        };
        let status = text[to + end.len()..]
            .split("@@")
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let printed = text[from..to].trim_end_matches('\n');
        let actual: Vec<&str> = if printed.is_empty() {
            Vec::new()
        } else {
            printed.lines().map(|l| l.trim_end_matches('\r')).collect()
        };
        if status != "0" {
            failures.push(format!(
                "{}: `{}` exited {status}:\n{printed}",
                example.at, example.command
            ));
        } else if !lines_match(&example.expected, &actual) {
            failures.push(format!(
                "{}: `{}` printed\n{printed}\nwhere the docs show\n{}",
                example.at,
                example.command,
                example.expected.join("\n")
            ));
        }
    }
    if !failures.is_empty() {
        let logs = logs_of(work.path());
        bail!(
            "{relative}: {} example(s) do not hold:\n\n{}\n\n{logs}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    Ok(())
}

/// The tails of the logs the session wrote, for a failure's report.
fn logs_of(dir: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            out.push_str(&format!("--- {} ---\n{tail}\n", path.display()));
        }
    }
    out
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

#[test]
fn the_readme_examples_hold() -> Result<()> {
    run_file("README.md")
}

#[test]
fn the_docs_examples_hold() -> Result<()> {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("docs"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        // MESHWORK_DOCS_ONLY=mesh.md: one file, while writing it.
        .filter(|name| std::env::var("MESHWORK_DOCS_ONLY").map_or(true, |only| *name == only))
        .collect();
    files.sort();
    let mut failed = Vec::new();
    for name in files {
        if let Err(e) = run_file(&format!("docs/{name}")) {
            failed.push(format!("{e:#}"));
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n\n"));
    }
    Ok(())
}

#[test]
fn the_example_format_is_read_as_documented() -> Result<()> {
    let body = [
        "$ echo one \\",
        "  two",
        "one two",
        "$ cat <<'EOF'",
        "a",
        "EOF",
        "a",
        "$ printf '%s\\n' \"x",
        "> y\"",
        "x",
        "y",
        "$ true",
    ];
    let examples = commands("x.md", 0, &body)?;
    assert_eq!(examples.len(), 4);
    assert_eq!(examples[0].command, "echo one \\\n  two");
    assert_eq!(examples[0].expected, ["one two"]);
    assert_eq!(examples[1].command, "cat <<'EOF'\na\nEOF");
    assert_eq!(examples[1].expected, ["a"]);
    assert_eq!(examples[2].command, "printf '%s\\n' \"x\ny\"");
    assert!(examples[3].expected.is_empty());
    assert!(line_matches(
        "[..]\"name\": \"api\",",
        "      \"name\": \"api\","
    ));
    assert!(!line_matches(
        "[..]\"name\": \"api\",",
        "      \"name\": \"web\","
    ));
    let wanted = ["first".to_owned(), "...".to_owned(), "last".to_owned()];
    assert!(lines_match(&wanted, &["first", "x", "y", "last"]));
    assert!(lines_match(&wanted, &["first", "last"]));
    assert!(!lines_match(&wanted, &["first", "x"]));
    assert!(commands("x.md", 0, &["output first"]).is_err());
    Ok(())
}
