//! virtio-console with one port, as a second console (`/dev/hvc0` in the
//! guest). What the guest writes goes to a host file; the guest reads
//! nothing from it yet. The file grows to a limit and no further: a guest
//! that writes forever must not fill the host's disk (issue 14, hole 5).

use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::Reader;

use super::worker::{spawn_queue_worker, Worker};
use super::{Activation, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::migration::failover::{OutputGate, OutputSink};

const QUEUE_SIZE: u16 = 64;
/// Queue 0 receives (unused: no input yet); queue 1 transmits.
const TX: usize = 1;
/// Bytes taken from one transmit buffer at most.
const MAX_CHUNK: usize = 64 * 1024;

/// How large the output file may grow by default.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 64 << 20;

/// Counters of the console device.
#[derive(Debug, Default)]
pub struct ConsoleMetrics {
    /// Bytes the guest wrote that went to the file.
    pub written: AtomicU64,
    /// Bytes the guest wrote after the file reached its limit (dropped).
    pub dropped: AtomicU64,
}

/// The output file, appended to until it holds `limit` bytes (counting
/// what it held before); the rest is dropped and counted.
pub struct CappedOutput {
    file: File,
    len: u64,
    limit: u64,
    metrics: Arc<ConsoleMetrics>,
}

impl CappedOutput {
    pub fn new(file: File, limit: u64, metrics: Arc<ConsoleMetrics>) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(CappedOutput {
            file,
            len,
            limit,
            metrics,
        })
    }

    /// Append what fits under the limit; drop (and count) the rest.
    pub fn write(&mut self, data: &[u8]) {
        let room = usize::try_from(self.limit.saturating_sub(self.len)).unwrap_or(usize::MAX);
        let (keep, drop) = data.split_at(data.len().min(room));
        if !keep.is_empty() {
            match self.file.write_all(keep) {
                Ok(()) => {
                    self.len += keep.len() as u64;
                    self.metrics.written.fetch_add(keep.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!("virtio-console: writing the output file: {e}");
                    self.metrics.dropped.fetch_add(keep.len() as u64, Ordering::Relaxed);
                }
            }
        }
        if !drop.is_empty() {
            let before = self.metrics.dropped.fetch_add(drop.len() as u64, Ordering::Relaxed);
            if before == 0 {
                tracing::warn!(
                    "virtio-console: the output file reached its limit of {} bytes; \
                     further guest output is dropped (and counted)",
                    self.limit
                );
            }
        }
    }
}

/// The output file as the failover gate's sink.
struct GatedOutput(std::sync::Mutex<CappedOutput>);

impl OutputSink for GatedOutput {
    fn emit(&self, data: &[u8]) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(data);
    }
}

pub struct Console {
    output: File,
    limit: u64,
    /// Failover's output gate, once the VM was protected: the guest's
    /// output goes through it (held until its epoch is acknowledged).
    gate: Arc<std::sync::OnceLock<Arc<OutputGate>>>,
    pub metrics: Arc<ConsoleMetrics>,
    worker: Option<Worker>,
}

impl Console {
    /// A console whose output file grows to [`DEFAULT_OUTPUT_LIMIT`].
    pub fn new(output: File) -> Self {
        Self::with_limit(output, DEFAULT_OUTPUT_LIMIT)
    }

    /// A console whose output file grows to `limit` bytes at most.
    pub fn with_limit(output: File, limit: u64) -> Self {
        Console {
            output,
            limit,
            gate: Arc::default(),
            metrics: Arc::default(),
            worker: None,
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, _acked: u64, a: Activation) -> std::io::Result<()> {
        let output = CappedOutput::new(self.output.try_clone()?, self.limit, self.metrics.clone())?;
        let output: Arc<dyn OutputSink> = Arc::new(GatedOutput(std::sync::Mutex::new(output)));
        let gate = self.gate.clone();
        let mut buf = vec![0u8; MAX_CHUNK];
        self.worker = Some(spawn_queue_worker("virtio-console", a, TX, move |mem, chain, _dma| {
            if let Ok(mut r) = Reader::<()>::new(mem, chain) {
                let n = r.available_bytes().min(MAX_CHUNK);
                if r.read_exact(&mut buf[..n]).is_ok() {
                    match gate.get() {
                        Some(g) => g.send_to(&output, &buf[..n]),
                        None => output.emit(&buf[..n]),
                    }
                }
            }
            0
        })?);
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Worker> {
        self.worker.take()
    }

    fn set_output_gate(&mut self, gate: Arc<OutputGate>) {
        let _ = self.gate.set(gate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_append(p: &std::path::Path) -> File {
        std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap()
    }

    #[test]
    fn output_stops_at_the_limit_and_counts_the_rest() {
        let dir = std::env::temp_dir().join(format!("vessel-hvc-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.log");
        std::fs::write(&p, b"earlier run\n").unwrap();
        let m = Arc::new(ConsoleMetrics::default());
        let mut out = CappedOutput::new(open_append(&p), 100, m.clone()).unwrap();
        for _ in 0..10 {
            out.write(&[b'x'; 30]);
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 100);
        assert_eq!(m.written.load(Ordering::Relaxed), 88);
        assert_eq!(m.dropped.load(Ordering::Relaxed), 300 - 88);
        // A new run appends to the same file: it is full already.
        let m2 = Arc::new(ConsoleMetrics::default());
        let mut out = CappedOutput::new(open_append(&p), 100, m2.clone()).unwrap();
        out.write(b"more");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 100);
        assert_eq!(m2.dropped.load(Ordering::Relaxed), 4);
        let text = std::fs::read(&p).unwrap();
        assert!(text.starts_with(b"earlier run\nxxx"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
