//! Structured logs on stderr, plain or JSON. Writes to stderr; nothing else.

use std::fmt;

use tracing::{Level, Subscriber};
use tracing_subscriber::{
    filter::Targets,
    fmt::{MakeWriter, format::FmtSpan},
};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, with the review's span fields (uid, kind, `object_name`...) on it.
    Json,
}

/// Installs the global subscriber. A second call (as in tests) is ignored.
pub fn init(format: LogFormat, level: Level) {
    let _ = tracing::subscriber::set_global_default(subscriber(format, level, std::io::stderr));
}

/// The subscriber [`init`] installs, writing to `writer`: tests capture the lines with it.
pub fn subscriber<W>(
    format: LogFormat,
    level: Level,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt as _;
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(writer)
        .with_span_events(FmtSpan::NONE)
        .with_target(false);
    // kube-runtime's watcher logs each failed list or watch as a raw `Api(Status {...})` dump,
    // once a second while the apiserver refuses it; the cache logs the same failure once, with
    // the verb and resource RBAC must allow. Its errors still show.
    let quiet = Targets::new()
        .with_default(level)
        .with_target("kube_runtime", Level::ERROR);
    match format {
        LogFormat::Plain => Box::new(builder.with_ansi(false).finish().with(quiet)),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish()
                .with(quiet),
        ),
    }
}

/// Text from a request, for a log field: control characters (newlines, ANSI escapes) and
/// backslashes are written as Rust escapes (`\n`, `\u{1b}`, `\\`), so a uid or name cannot end
/// a plain log line and forge the next one. Everything else is written as it is.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for c in self.0.chars() {
            if c.is_control() || c == '\\' {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            Escaped("u-1\nINFO forged\u{1b}[31m\\é").to_string(),
            "u-1\\nINFO forged\\u{1b}[31m\\\\é"
        );
        assert_eq!(Escaped("ak-outpost-x").to_string(), "ak-outpost-x");
    }
}
