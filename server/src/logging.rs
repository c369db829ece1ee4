//! Structured logs (SPEC §11) through `tracing`: one JSON object per line on standard output (or a
//! readable line with `log_format = "pretty"`), with the fields of the event and of every span it
//! happens in flattened into the line — `request_id` (an HTTP request's span), `user_id`,
//! `session_id`, `room`, `conn`, `trace_id` (a WebSocket request followed from the connection's
//! shard to the room's home). Hand-written as a `tracing-subscriber` layer rather than its `fmt`
//! JSON formatter, which nests span fields under `span` and names the message `message`: the
//! lines keep the flat shape operators and the tests read (`"msg":"listening"`). Callers never
//! pass secrets; tokens are masked before logging.

use std::fmt::Write as _;
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

/// The target of the lines written at every level (`listening`, `stopped`): operators and tools
/// wait for them even with `log_level = "warn"`.
pub const LIFECYCLE: &str = "ringhub::lifecycle";

/// A field's value as it is written: JSON numbers and booleans stay unquoted.
#[derive(Debug, Clone)]
enum FieldValue {
    Text(String),
    Raw(String),
}

/// Fields in the order recorded; a later value of the same name replaces the earlier one.
#[derive(Debug, Default, Clone)]
struct Fields(Vec<(&'static str, FieldValue)>);

impl Fields {
    fn set(&mut self, name: &'static str, value: FieldValue) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
}

/// Collects fields, keeping `message` apart.
struct Collect<'a> {
    fields: &'a mut Fields,
    message: Option<&'a mut String>,
}

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.text(field, format!("{value:?}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value <= MAX_SAFE_INTEGER, value.to_string());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(
            field,
            value.unsigned_abs() <= MAX_SAFE_INTEGER,
            value.to_string(),
        );
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields
            .set(field.name(), FieldValue::Raw(value.to_string()));
    }
}

/// The largest integer every JSON reader holds exactly (JavaScript, jq: doubles).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

impl Collect<'_> {
    /// A number, bare when JSON readers keep it exact, else quoted (connection ids carry the
    /// shard in their top bits).
    fn number(&mut self, field: &Field, exact: bool, text: String) {
        let value = if exact {
            FieldValue::Raw(text)
        } else {
            FieldValue::Text(text)
        };
        self.fields.set(field.name(), value);
    }

    fn text(&mut self, field: &Field, value: String) {
        match (&mut self.message, field.name()) {
            (Some(message), "message") => **message = value,
            (_, name) => self.fields.set(name, FieldValue::Text(value)),
        }
    }
}

/// The layer that writes every event as one line.
struct Lines {
    pretty: bool,
    max: Level,
}

impl<S> Layer<S> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        *metadata.level() <= self.max || metadata.target() == LIFECYCLE
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        // Lifecycle lines are info: never filter below it globally (callsites this layer does not
        // enable are still disabled once, at registration).
        Some(tracing::level_filters::LevelFilter::from_level(
            self.max.max(Level::INFO),
        ))
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut Collect {
            fields: &mut fields,
            message: None,
        });
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(&mut Collect {
                fields,
                message: None,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        // Span fields first, outermost to innermost; the event's own fields last (they win).
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(span_fields) = span.extensions().get::<Fields>() {
                    for (name, value) in &span_fields.0 {
                        fields.set(name, value.clone());
                    }
                }
            }
        }
        let mut message = String::new();
        event.record(&mut Collect {
            fields: &mut fields,
            message: Some(&mut message),
        });
        let metadata = event.metadata();
        let line = render(self.pretty, metadata, &message, &fields);
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

fn json_string(text: &str) -> String {
    sonic_rs::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

fn render(
    pretty: bool,
    metadata: &tracing::Metadata<'_>,
    message: &str,
    fields: &Fields,
) -> String {
    let ts = crate::clock::now_ms();
    let level = level_name(metadata.level());
    let mut line = String::with_capacity(128);
    if pretty {
        let _ = write!(
            line,
            "{ts} {level:5} {} {}",
            metadata.target(),
            readable(message, false)
        );
        for (name, value) in &fields.0 {
            let (FieldValue::Text(v) | FieldValue::Raw(v)) = value;
            let _ = write!(line, " {name}={}", readable(v, true));
        }
    } else {
        let _ = write!(
            line,
            "{{\"ts\":{ts},\"level\":\"{level}\",\"target\":{},\"msg\":{}",
            json_string(metadata.target()),
            json_string(message)
        );
        for (name, value) in &fields.0 {
            let _ = match value {
                FieldValue::Text(v) => write!(line, ",{}:{}", json_string(name), json_string(v)),
                FieldValue::Raw(v) => write!(line, ",{}:{v}", json_string(name)),
            };
        }
        line.push('}');
    }
    line.push('\n');
    line
}

/// A text as a readable line shows it: quoted and escaped when it holds a control character (a
/// newline must not start a forged line) or, for a field's value, a space, quote or `=`.
fn readable(text: &str, is_value: bool) -> std::borrow::Cow<'_, str> {
    let plain = !text
        .chars()
        .any(|c| c.is_control() || (is_value && (c.is_whitespace() || c == '"' || c == '=')));
    if plain {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(format!("{text:?}"))
    }
}

/// Installs the logger once (later calls are ignored): JSON lines, or readable ones with
/// `pretty`, at `level` (`error` … `trace`; anything else is `info`).
pub fn init(pretty: bool, level: &str) {
    let max = match level {
        "error" => Level::ERROR,
        "warn" => Level::WARN,
        "debug" => Level::DEBUG,
        "trace" => Level::TRACE,
        _ => Level::INFO,
    };
    let _ = tracing_subscriber::registry()
        .with(Lines { pretty, max })
        .try_init();
}

/// Runs `work` inside the span of HTTP request `request_id`: every line it logs carries the id.
/// The span is made at level `error` so that it exists whatever `log_level` is (a span's level
/// only decides whether it is made): the warnings and errors of a request, the lines that remain
/// at `log_level = "warn"`, carry its id too.
pub fn with_request_id<T>(request_id: &str, work: impl FnOnce() -> T) -> T {
    tracing::error_span!("request", request_id = %request_id).in_scope(work)
}

/// An e-mail as logs show it: first character, `***`, the domain (`a***@example.com`).
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_flatten_span_and_event_fields_and_keep_numbers_bare() {
        let mut fields = Fields::default();
        fields.set("request_id", FieldValue::Text("r-1".into()));
        fields.set("conn", FieldValue::Raw("42".into()));
        fields.set("request_id", FieldValue::Text("r-2".into()));
        let metadata = tracing::Metadata::new(
            "event",
            "ringhub::test",
            Level::INFO,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        );
        let line = render(false, &metadata, "said \"hi\"", &fields);
        let tail = line.split_once(",\"level\"").map(|(_, t)| t).unwrap();
        assert_eq!(
            tail,
            ":\"info\",\"target\":\"ringhub::test\",\"msg\":\"said \\\"hi\\\"\",\"request_id\":\"r-2\",\"conn\":42}\n"
        );
        let pretty = render(true, &metadata, "said", &fields);
        assert!(
            pretty.ends_with(" info  ringhub::test said request_id=r-2 conn=42\n"),
            "{pretty}"
        );
        fields.set("email", FieldValue::Text("a\n{\"level\":\"error\"}".into()));
        let forged = render(true, &metadata, "two\nlines", &fields);
        assert_eq!(forged.matches('\n').count(), 1, "{forged}");
        assert!(
            forged.contains(r#"email="a\n{\"level\":\"error\"}""#),
            "{forged}"
        );
    }

    struct NoCallsite;
    static CALLSITE: NoCallsite = NoCallsite;
    impl tracing::callsite::Callsite for NoCallsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unreachable!("not registered")
        }
    }

    #[test]
    fn e_mails_are_masked() {
        assert_eq!(mask_email("alice@example.com"), "a***@example.com");
        assert_eq!(mask_email("nope"), "***");
    }
}
