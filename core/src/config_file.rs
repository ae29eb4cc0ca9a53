//! Config-file errors as both binaries report them: one line per problem,
//! naming the line of the file it is on (`line 7: unknown field ...`),
//! never toml's multi-line excerpt (a journal shows one line per entry).

/// A TOML parse or type error as one line, with the line it points at
/// and the key set on that line (when the message does not name it).
pub fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return message.to_owned();
    };
    let line = line_of_offset(text, span.start);
    match key_on_line(text, line) {
        Some(key) if !message.contains(&format!("`{key}`")) => {
            format!("line {line}: `{key}`: {message}")
        }
        _ => format!("line {line}: {message}"),
    }
}

/// The key a `key = value` line sets (dotted keys whole), if it is one.
fn key_on_line(text: &str, line: usize) -> Option<&str> {
    let (key, _) = text.lines().nth(line.checked_sub(1)?)?.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[') && !key.starts_with('#')).then_some(key)
}

/// The 1-based line a byte offset of `text` falls on.
pub fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The 1-based line on which top-level key (or table) `key` is set.
pub fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            let rest = line
                .strip_prefix(key)
                .or_else(|| line.strip_prefix(&format!("\"{key}\"")))
                .or_else(|| line.strip_prefix(&format!("[{key}]")).map(|_| "="));
            rest.is_some_and(|r| r.trim_start().starts_with('=') || r.trim_start().starts_with('.'))
        })
        .map(|i| i + 1)
}

/// The 1-based line on which the value at `path` is set: a dotted path
/// with array-of-tables indexes, as `service.checks[0].interval` or
/// `upstreams[1].retries.attempts` (a key inside an inline table is found
/// on the line of the table's key). `None` when it cannot be found (a
/// value left to its default).
pub fn line_of_path(text: &str, path: &str) -> Option<usize> {
    let segments: Vec<(&str, Option<usize>)> = path
        .split('.')
        .map(|seg| match seg.split_once('[') {
            Some((name, index)) => (name, index.trim_end_matches(']').parse().ok()),
            None => (seg, None),
        })
        .collect();
    let lines: Vec<&str> = text.lines().collect();
    // The longest table prefix whose section sets the next segment's key.
    for cut in (0..segments.len()).rev() {
        let (table, key) = (&segments[..cut], segments[cut].0);
        let Some((start, end)) = section(&lines, table) else {
            continue;
        };
        if let Some(found) = (start..end).find(|&i| sets_key(lines[i], key)) {
            return Some(found + 1);
        }
    }
    None
}

/// The lines `[start, end)` of the table at `path` (the top level for an
/// empty path): after its header, up to the next header.
fn section(lines: &[&str], path: &[(&str, Option<usize>)]) -> Option<(usize, usize)> {
    let header = |line: &str| line.trim_start().starts_with('[');
    let start = if path.is_empty() {
        0
    } else {
        let name = path.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(".");
        let index = path.last().and_then(|(_, i)| *i);
        let (single, array) = (format!("[{name}]"), format!("[[{name}]]"));
        let mut seen = 0;
        let mut found = None;
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim();
            let line = line.split('#').next().unwrap_or(line).trim();
            if index.is_none() && line == single {
                found = Some(i + 1);
                break;
            }
            if line == array {
                if index.is_none_or(|n| n == seen) {
                    found = Some(i + 1);
                    break;
                }
                seen += 1;
            }
        }
        found?
    };
    let end = (start..lines.len())
        .find(|&i| header(lines[i]))
        .unwrap_or(lines.len());
    Some((start, end))
}

/// Whether `line` sets `key` (`key = …`, `"key" = …` or `key.sub = …`).
fn sets_key(line: &str, key: &str) -> bool {
    let line = line.trim_start();
    let rest = line
        .strip_prefix(key)
        .or_else(|| line.strip_prefix(&format!("\"{key}\"")));
    rest.is_some_and(|r| {
        let r = r.trim_start();
        r.starts_with('=') || r.starts_with('.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        port: u16,
        name: Option<String>,
    }

    #[test]
    fn paths_are_found_on_their_lines() {
        let text = "name = \"x\"\n[service]\nport = 80\n[[service.checks]]\ntcp = \"a\"\n\
                    [[service.checks]]\ninterval = \"5x\" # bad\n[[upstreams]]\nname = \"api\"\n\
                    retries = { attempts = -1 }\n";
        assert_eq!(line_of_path(text, "name"), Some(1));
        assert_eq!(line_of_path(text, "service.port"), Some(3));
        assert_eq!(line_of_path(text, "service.checks[1].interval"), Some(7));
        assert_eq!(line_of_path(text, "service.checks[0].tcp"), Some(5));
        assert_eq!(
            line_of_path(text, "upstreams[0].retries.attempts"),
            Some(10)
        );
        assert_eq!(line_of_path(text, "service.checks[0].interval"), None);
        assert_eq!(line_of_path(text, "admin.listen"), None);
    }

    #[test]
    fn errors_are_one_line_naming_theirs() {
        let text = "port = 80\n\nname = \"a\"\nwieght = 3\n";
        let err = toml::from_str::<File>(text).expect_err("unknown field");
        let line = toml_error(text, &err);
        assert!(line.starts_with("line 4: unknown field `wieght`"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        let text = "port = \"eighty\"\n";
        let err = toml::from_str::<File>(text).expect_err("bad type");
        let line = toml_error(text, &err);
        assert!(line.starts_with("line 1: `port`: invalid type"), "{line}");
        let text = "port = 80\nname = [\n";
        let err = toml::from_str::<File>(text).expect_err("bad syntax");
        assert!(
            toml_error(text, &err).starts_with("line "),
            "{}",
            toml_error(text, &err)
        );
    }

    #[test]
    fn keys_and_offsets_find_their_lines() {
        let text = "a = 1\n[b]\nc = 2\n\"d\" = 3\ne.f = 4\n";
        assert_eq!(line_of_key(text, "a"), Some(1));
        assert_eq!(line_of_key(text, "b"), Some(2));
        assert_eq!(line_of_key(text, "d"), Some(4));
        assert_eq!(line_of_key(text, "e"), Some(5));
        assert_eq!(line_of_key(text, "x"), None);
        assert_eq!(line_of_offset(text, 0), 1);
        assert_eq!(line_of_offset(text, 6), 2);
        assert_eq!(line_of_offset(text, 10_000), 6);
    }
}
