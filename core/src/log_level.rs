//! Log filters as both binaries read them (`--log-level`, `RUST_LOG`): a
//! `trace` level that the build compiled out (release builds stop at
//! `debug`) is lowered to `debug` before the filter is built, so the
//! filter library's own warning about it — printed straight to stderr, in
//! colour even when stderr is the journal or a file — never comes, and
//! the caller can say it through its log instead.

use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};

/// `directives` (`warn,meshwork_registry=trace`) with each `trace` level
/// lowered to `debug` when this build has no trace level; true when one
/// was.
pub fn within_build(directives: &str) -> (String, bool) {
    lower_trace(directives, STATIC_MAX_LEVEL < LevelFilter::TRACE)
}

fn lower_trace(directives: &str, compiled_out: bool) -> (String, bool) {
    if !compiled_out {
        return (directives.to_owned(), false);
    }
    let mut lowered = false;
    let out: Vec<String> = directives
        .split(',')
        .map(|directive| {
            // The level is the whole directive, or what follows its last '='.
            let (target, level) = match directive.rsplit_once('=') {
                Some((target, level)) => (Some(target), level),
                None => (None, directive),
            };
            if !level.trim().eq_ignore_ascii_case("trace") {
                return directive.to_owned();
            }
            lowered = true;
            match target {
                Some(target) => format!("{target}=debug"),
                None => "debug".to_owned(),
            }
        })
        .collect();
    (out.join(","), lowered)
}

#[cfg(test)]
mod tests {
    use super::lower_trace;

    #[test]
    fn trace_is_lowered_only_where_compiled_out() {
        assert_eq!(
            lower_trace("warn,meshwork_registry=trace,TRACE", true),
            ("warn,meshwork_registry=debug,debug".to_owned(), true)
        );
        assert_eq!(
            lower_trace("info,h2=debug", true),
            ("info,h2=debug".to_owned(), false)
        );
        assert_eq!(lower_trace("trace", false), ("trace".to_owned(), false));
        // A span filter keeps its braces and fields.
        assert_eq!(
            lower_trace("meshwork[req{id=1}]=trace", true),
            ("meshwork[req{id=1}]=debug".to_owned(), true)
        );
    }
}
