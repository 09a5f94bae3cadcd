//! The VMM's own log (tracing): to stderr by default, quiet unless `-v`;
//! `PUT /logger` (or Firecracker's `--log-path`/`--level` flags) moves it
//! to a file or named pipe and sets its level and format.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::fc;

static FILE: Mutex<Option<std::fs::File>> = Mutex::new(None);

type FmtLayer = fmt::Layer<Registry, fmt::format::DefaultFields, fmt::format::Format, LogWriter>;

struct Handles {
    filter: reload::Handle<EnvFilter, tracing_subscriber::layer::Layered<reload::Layer<FmtLayer, Registry>, Registry>>,
    format: reload::Handle<FmtLayer, Registry>,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

/// Writes each event to the log file when one is set, else to stderr.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut f = FILE.lock().unwrap_or_else(|e| e.into_inner());
        match f.as_mut() {
            Some(f) => f.write(buf),
            None => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

fn layer(show_level: bool, show_origin: bool) -> FmtLayer {
    fmt::layer()
        .with_writer(LogWriter)
        .with_ansi(false)
        .with_level(show_level)
        .with_file(show_origin)
        .with_line_number(show_origin)
}

/// Install the subscriber: `warn` by default, `info` with -v, `debug` with -vv.
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let (format, format_handle) = reload::Layer::new(layer(true, false));
    let (filter, filter_handle) = reload::Layer::new(EnvFilter::new(level));
    if tracing_subscriber::registry()
        .with(format)
        .with(filter)
        .try_init()
        .is_ok()
    {
        let _ = HANDLES.set(Handles {
            filter: filter_handle,
            format: format_handle,
        });
    }
}

/// Firecracker's level names (any case) as a tracing filter.
fn level_filter(level: &str) -> Result<&'static str, String> {
    Ok(match level.to_ascii_lowercase().as_str() {
        "error" => "error",
        "warning" | "warn" => "warn",
        "info" => "info",
        "debug" => "debug",
        "trace" => "trace",
        "off" => "off",
        _ => {
            return Err(format!(
                "level {level:?} must be Error, Warning, Info, Debug, Trace or Off"
            ))
        }
    })
}

/// Apply `PUT /logger`.
pub fn configure(l: &fc::Logger) -> Result<(), String> {
    let level = l.level.as_deref().map(level_filter).transpose()?;
    let filter = match (level, l.module.as_deref()) {
        (lvl, Some(m)) => {
            if m.is_empty() || !m.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                return Err(format!("module {m:?} is not a Rust module path"));
            }
            Some(format!("off,{m}={}", lvl.unwrap_or("info")))
        }
        (Some(lvl), None) => Some(lvl.to_string()),
        (None, None) => None,
    };
    let file = match &l.log_path {
        Some(p) => Some(crate::control::open_output(p).map_err(|e| format!("log_path {}: {e}", p.display()))?),
        None => None,
    };
    if let Some(h) = HANDLES.get() {
        if let Some(f) = filter {
            h.filter
                .reload(EnvFilter::new(f))
                .map_err(|e| format!("cannot set the log level: {e}"))?;
        }
        h.format
            .reload(layer(l.show_level.unwrap_or(true), l.show_log_origin.unwrap_or(false)))
            .map_err(|e| format!("cannot set the log format: {e}"))?;
    }
    if let Some(f) = file {
        *FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(level_filter("Warning").unwrap(), "warn");
        assert_eq!(level_filter("TRACE").unwrap(), "trace");
        assert!(level_filter("loud").is_err());
        assert!(configure(&fc::Logger {
            module: Some("a b".into()),
            ..Default::default()
        })
        .is_err());
    }
}
