//! Logging on stderr, one line per event, in one of two stable forms:
//!
//! - `text`: key=value pairs, always in this order: `timestamp` (RFC 3339, UTC), `level`
//!   (`ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`), `target` (the module), `message`, then
//!   the event's own fields. A value is written bare unless it is empty or holds a space,
//!   `"`, `=`, `\` or a control character; then it is quoted, with `\"`, `\\`, `\n`, `\r`,
//!   `\t` and `\u{..}` escapes, so an event never spans two lines. No colours.
//! - `json`: tracing-subscriber's JSON formatter, one object a line:
//!   `{"timestamp":..,"level":..,"fields":{"message":..,..},"target":..}`.
//!
//! The level is `warn` unless the command line asks otherwise (`--quiet`: `error`; `-v`:
//! `info`, `-vv`: `debug`, `-vvv`: `trace`); RUST_LOG, when set, decides instead. The
//! drop-in modes (`modes/`) take no usernet flags: they pick their level from their own
//! options and the form from USERNET_LOG_FORMAT.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The environment variable that picks the form when no `--log-format` is given.
pub const FORMAT_ENV: &str = "USERNET_LOG_FORMAT";

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// key=value pairs: timestamp, level, target, message, the event's fields.
    #[default]
    Text,
    /// One JSON object a line: timestamp, level, target, fields (with message).
    Json,
}

impl LogFormat {
    /// The form USERNET_LOG_FORMAT names (`text` when unset or unknown).
    pub fn from_env() -> LogFormat {
        match std::env::var(FORMAT_ENV).as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// The logging options every usernet command takes (before or after its name).
#[derive(clap::Args, Debug, Default)]
pub struct LogOpts {
    /// How log lines are written on stderr: `text` (key=value) or `json` (one object a line).
    #[arg(long = "log-format", value_enum, value_name = "FORMAT", default_value_t, global = true, env = FORMAT_ENV)]
    pub format: LogFormat,
    /// Log errors only (RUST_LOG, when set, decides instead).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Log more: -v info, -vv debug, -vvv trace (RUST_LOG, when set, decides instead).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl LogOpts {
    /// The level these options ask for.
    pub fn level(&self) -> &'static str {
        match (self.quiet, self.verbose) {
            (true, _) => "error",
            (false, 0) => "warn",
            (false, 1) => "info",
            (false, 2) => "debug",
            (false, _) => "trace",
        }
    }
}

/// Logs to stderr at `level` (RUST_LOG, when set, decides instead) in `format`.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false);
    let _ = match format {
        LogFormat::Text => builder.event_format(KeyValue).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Logs to `file` instead of stderr (gvproxy's `-log-file`), in the `text` form.
pub fn init_to_file(level: &str, file: std::fs::File) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let file = std::sync::Mutex::new(file);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(file)
        .with_ansi(false)
        .event_format(KeyValue)
        .try_init();
}

/// The `text` form (see the module's comment).
struct KeyValue;

impl<S, N> FormatEvent<S, N> for KeyValue
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = String::new();
        for (key, value) in
            [("timestamp", timestamp.as_str()), ("level", meta.level().as_str()), ("target", meta.target())]
                .into_iter()
                .chain([("message", fields.message.as_str())])
        {
            pair(&mut line, key, value);
        }
        for (key, value) in &fields.rest {
            pair(&mut line, key, value);
        }
        writeln!(w, "{}", &line[1..])
    }
}

/// The event's message and its other fields, in order.
#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl Fields {
    fn record(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = value,
            name => self.rest.push((name, value)),
        }
    }
}

/// Appends ` key=value` to `line`, the value quoted when it must be.
fn pair(line: &mut String, key: &str, value: &str) {
    let bare =
        !value.is_empty() && !value.chars().any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
    let _ = write!(line, " {key}=");
    if bare {
        line.push_str(value);
        return;
    }
    line.push('"');
    for c in value.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(line, "\\u{{{:x}}}", c as u32);
            }
            c => line.push(c),
        }
    }
    line.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(kv: &[(&str, &str)]) -> String {
        let mut line = String::new();
        for (k, v) in kv {
            pair(&mut line, k, v);
        }
        line
    }

    #[test]
    fn values_are_quoted_only_when_they_must_be() {
        assert_eq!(pairs(&[("level", "WARN"), ("port", "8080")]), " level=WARN port=8080");
        assert_eq!(pairs(&[("message", "link closed")]), " message=\"link closed\"");
        assert_eq!(
            pairs(&[("a", ""), ("b", "x=y"), ("c", "say \"hi\"\\")]),
            " a=\"\" b=\"x=y\" c=\"say \\\"hi\\\"\\\\\""
        );
        assert_eq!(pairs(&[("m", "two\nlines\t\r\u{1b}")]), " m=\"two\\nlines\\t\\r\\u{1b}\"");
    }

    #[test]
    fn levels_from_flags() {
        let o = |quiet, verbose| LogOpts { format: LogFormat::Text, quiet, verbose };
        assert_eq!(o(false, 0).level(), "warn");
        assert_eq!(o(true, 0).level(), "error");
        assert_eq!(o(false, 1).level(), "info");
        assert_eq!(o(false, 2).level(), "debug");
        assert_eq!(o(false, 5).level(), "trace");
    }
}
