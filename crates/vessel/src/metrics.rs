//! Firecracker-style metrics: counters grouped as Firecracker names them
//! (`put_api_requests.drive_count`, `..._fails`), written as one JSON line
//! per flush to the file or named pipe given by `PUT /metrics`, every 60 s
//! and on `FlushMetrics`. As in Firecracker, each line holds the counts
//! since the previous line.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How often metrics are written without being asked.
pub const FLUSH_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Default)]
struct Inner {
    out: Option<std::fs::File>,
    counts: BTreeMap<&'static str, BTreeMap<String, u64>>,
    startup_us: Option<u64>,
}

/// The metrics of one VMM, shared by the API and the controller.
#[derive(Clone, Default)]
pub struct MetricsSink {
    inner: Arc<Mutex<Inner>>,
}

impl MetricsSink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the lines go (once).
    pub fn open(&self, path: &Path) -> Result<(), String> {
        let f = crate::control::open_output(path).map_err(|e| format!("metrics_path {}: {e}", path.display()))?;
        self.lock().out = Some(f);
        Ok(())
    }

    /// Count a request under `group`: `name_count` when it succeeded (or
    /// `name` itself if it already ends in `_count`), `name_fails` when not.
    pub fn count(&self, group: &'static str, name: &str, ok: bool) {
        let key = if name.ends_with("_count") {
            if ok {
                name.to_string()
            } else {
                format!("{}_fails", name.trim_end_matches("_count"))
            }
        } else if ok {
            format!("{name}_count")
        } else {
            format!("{name}_fails")
        };
        *self.lock().counts.entry(group).or_default().entry(key).or_default() += 1;
    }

    /// Record the time from process start to the API being ready.
    pub fn set_startup(&self, since: Instant) {
        self.lock().startup_us = Some(since.elapsed().as_micros() as u64);
    }

    /// The line a flush writes now (and the counters it resets).
    fn take_line(inner: &mut Inner) -> String {
        let mut doc = serde_json::Map::new();
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        doc.insert("utc_timestamp_ms".into(), ms.into());
        let mut api = serde_json::Map::new();
        api.insert("process_startup_time_us".into(), inner.startup_us.unwrap_or(0).into());
        doc.insert("api_server".into(), api.into());
        for (group, counts) in std::mem::take(&mut inner.counts) {
            let g: serde_json::Map<String, serde_json::Value> =
                counts.into_iter().map(|(k, v)| (k, v.into())).collect();
            doc.insert(group.into(), g.into());
        }
        serde_json::Value::Object(doc).to_string()
    }

    /// Write one line now. Without a metrics file this does nothing.
    pub fn flush(&self) -> Result<(), String> {
        let mut inner = self.lock();
        if inner.out.is_none() {
            return Ok(());
        }
        let line = Self::take_line(&mut inner);
        if let Some(out) = inner.out.as_mut() {
            writeln!(out, "{line}").map_err(|e| format!("writing metrics: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_hold_counts_since_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        let m = MetricsSink::default();
        m.flush().unwrap(); // no file yet: nothing to do
        m.open(&path).unwrap();
        m.count("put_api_requests", "drive", true);
        m.count("put_api_requests", "drive", false);
        m.count("get_api_requests", "instance_info_count", true);
        m.flush().unwrap();
        m.count("put_api_requests", "drive", true);
        m.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["put_api_requests"]["drive_count"], 1);
        assert_eq!(lines[0]["put_api_requests"]["drive_fails"], 1);
        assert_eq!(lines[0]["get_api_requests"]["instance_info_count"], 1);
        assert_eq!(lines[1]["put_api_requests"]["drive_count"], 1);
        assert!(lines[1]["put_api_requests"].get("drive_fails").is_none());
        assert!(lines[1]["utc_timestamp_ms"].as_u64().unwrap() > 0);
    }
}
