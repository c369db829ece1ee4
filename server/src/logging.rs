//! Structured logs (SPEC §11): one JSON object per line on standard output (or a readable line
//! with `log_format = "pretty"`). Callers never pass secrets; tokens are masked before logging.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

thread_local! {
    /// The request a blocking thread is working for, added to its log lines.
    static REQUEST_ID: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `work` with `request_id` attached to every log line it writes on this thread.
pub fn with_request_id<T>(request_id: String, work: impl FnOnce() -> T) -> T {
    REQUEST_ID.with(|r| *r.borrow_mut() = Some(request_id));
    let out = work();
    REQUEST_ID.with(|r| *r.borrow_mut() = None);
    out
}

struct Logger {
    pretty: bool,
    level: LevelFilter,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let level = record.level().as_str().to_ascii_lowercase();
        let msg = record.args().to_string();
        let line = if self.pretty {
            format!("{ts} {level:5} {} {msg}\n", record.target())
        } else {
            #[derive(serde::Serialize)]
            struct Line<'a> {
                ts: u128,
                level: &'a str,
                target: &'a str,
                #[serde(skip_serializing_if = "Option::is_none")]
                request_id: Option<&'a str>,
                msg: &'a str,
            }
            let request_id = REQUEST_ID.with(|r| r.borrow().clone());
            let mut s = sonic_rs::to_string(&Line {
                ts,
                level: &level,
                target: record.target(),
                request_id: request_id.as_deref(),
                msg: &msg,
            })
            .unwrap_or_default();
            s.push('\n');
            s
        };
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stdout().lock().flush();
    }
}

/// Installs the logger once (later calls are ignored).
pub fn init(pretty: bool, level: &str) {
    let level = match level {
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => LevelFilter::Info,
    };
    if log::set_boxed_logger(Box::new(Logger { pretty, level })).is_ok() {
        log::set_max_level(level);
    }
    let _ = Level::Info;
}

/// Writes one JSON event line with extra fields (used for the `listening` line tests read).
pub fn event(msg: &str, fields: &[(&str, &str)]) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut map: Vec<(String, String)> =
        vec![("level".into(), "info".into()), ("msg".into(), msg.into())];
    map.extend(
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let mut line = format!("{{\"ts\":{ts}");
    for (k, v) in &map {
        line.push(',');
        line.push_str(&sonic_rs::to_string(k).unwrap_or_default());
        line.push(':');
        line.push_str(&sonic_rs::to_string(v).unwrap_or_default());
    }
    line.push_str("}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
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
