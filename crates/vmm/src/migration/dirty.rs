//! Dirty-page tracking for live migration under emu: one bit per guest
//! page, set when a vCPU fills a TLB entry for writing (x86emu asks the
//! bus, `Bus::note_write_mapping`), when it sets accessed/dirty bits in a
//! page table, and when a device writes guest memory (the DMA observer).
//!
//! A vCPU writes through cached host pointers without asking again, so
//! after the bitmap is harvested every vCPU must drop its write
//! translations before the harvested pages are read: a write through an
//! old entry went to a page that was marked when the entry was filled (so
//! it is in the harvest and read afterwards), and every later write
//! refills and marks. [`DirtyLog::harvest`] does the swap; the caller then
//! runs [`DirtyLog::request_flush`] and waits in [`DirtyLog::wait_flushed`].
//! When tracking is off nothing is marked and the write path is unchanged
//! (the check is on TLB fills only).
//!
//! Under kvm the vCPUs write guest memory without the VMM seeing it: the
//! engine logs those writes itself ([`EngineDirtyLog`], KVM's dirty log),
//! `enable`/`disable` start and stop that log, and `harvest` first merges
//! it into this bitmap. The rounds of pre-copy read only this bitmap, so
//! they are the same under both engines; devices' writes reach it through
//! the DMA observer under both.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::engine::EngineDirtyLog;
use crate::machine::MAX_CPUS;

const PAGE_SHIFT: u64 = 12;

pub struct DirtyLog {
    enabled: AtomicBool,
    /// One bit per 4 KiB page of guest-physical space (allocated at the
    /// first enable).
    bits: OnceLock<Box<[AtomicU64]>>,
    /// Asked-for TLB flush generation, and each vCPU's last done.
    flush_generation: AtomicU64,
    flushed: [AtomicU64; MAX_CPUS as usize],
    flush_wanted: AtomicBool,
    /// vCPU throttle for auto-converge, in percent of time (0 = none).
    throttle_percent: AtomicU8,
    /// The engine's own log of the vCPUs' writes (kvm), set once when the
    /// machine is built.
    engine: OnceLock<Arc<dyn EngineDirtyLog>>,
    /// Whether the engine's log is on.
    engine_logging: AtomicBool,
}

impl Default for DirtyLog {
    fn default() -> Self {
        DirtyLog {
            enabled: AtomicBool::new(false),
            bits: OnceLock::new(),
            flush_generation: AtomicU64::new(0),
            flushed: std::array::from_fn(|_| AtomicU64::new(0)),
            flush_wanted: AtomicBool::new(false),
            throttle_percent: AtomicU8::new(0),
            engine: OnceLock::new(),
            engine_logging: AtomicBool::new(false),
        }
    }
}

impl DirtyLog {
    /// The engine logs the vCPUs' writes itself (kvm): `enable`, `harvest`
    /// and `disable` drive its log too. Set once, when the machine is built.
    pub fn set_engine(&self, engine: Arc<dyn EngineDirtyLog>) {
        let _ = self.engine.set(engine);
    }

    /// Start tracking writes below `phys_limit` (and the engine's log).
    pub fn enable(&self, phys_limit: u64) -> Result<(), String> {
        let words = phys_limit.div_ceil(1 << PAGE_SHIFT).div_ceil(64) as usize;
        let bits = self
            .bits
            .get_or_init(|| (0..words).map(|_| AtomicU64::new(0)).collect());
        for w in bits.iter() {
            w.store(0, Ordering::Relaxed);
        }
        self.enabled.store(true, Ordering::Release);
        if let Some(engine) = self.engine.get() {
            self.engine_logging.store(true, Ordering::Release);
            if let Err(e) = engine.start() {
                self.disable();
                return Err(format!("starting the engine's dirty-page log: {e}"));
            }
        }
        Ok(())
    }

    /// Stop tracking (and throttling, and the engine's log).
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Release);
        self.throttle_percent.store(0, Ordering::Relaxed);
        if let Some(engine) = self.engine.get() {
            if self.engine_logging.swap(false, Ordering::AcqRel) {
                if let Err(e) = engine.stop() {
                    tracing::warn!("stopping the engine's dirty-page log: {e}");
                }
            }
        }
    }

    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Note a write to the page holding `gpa`.
    #[inline]
    pub fn mark(&self, gpa: u64) {
        if !self.enabled() {
            return;
        }
        self.set_bit(gpa);
    }

    #[inline]
    fn set_bit(&self, gpa: u64) {
        if let Some(w) = self.bits.get().and_then(|b| b.get((gpa >> PAGE_SHIFT >> 6) as usize)) {
            w.fetch_or(1 << ((gpa >> PAGE_SHIFT) & 63), Ordering::AcqRel);
        }
    }

    /// Note a write to `len` bytes at `gpa` (device DMA).
    pub fn mark_range(&self, gpa: u64, len: u64) {
        if !self.enabled() || len == 0 {
            return;
        }
        let first = gpa >> PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> PAGE_SHIFT;
        for p in first..=last {
            self.mark(p << PAGE_SHIFT);
        }
    }

    /// The pages (guest-physical addresses) marked since the last harvest,
    /// in order, the engine's log merged in; their bits are cleared. An
    /// error when the engine's log could not be read (its pages are then
    /// unknown: the migration must not go on).
    pub fn harvest(&self) -> Result<Vec<u64>, String> {
        if let Some(engine) = self.engine.get() {
            if self.engine_logging.load(Ordering::Acquire) {
                engine
                    .collect(&mut |gpa| self.set_bit(gpa))
                    .map_err(|e| format!("reading the engine's dirty-page log: {e}"))?;
            }
        }
        let mut out = Vec::new();
        let Some(bits) = self.bits.get() else {
            return Ok(out);
        };
        for (i, w) in bits.iter().enumerate() {
            let mut v = w.swap(0, Ordering::AcqRel);
            while v != 0 {
                let b = v.trailing_zeros() as u64;
                out.push(((i as u64) * 64 + b) << PAGE_SHIFT);
                v &= v - 1;
            }
        }
        Ok(out)
    }

    /// Ask every vCPU to drop its cached translations; the generation to
    /// wait for. With an engine that logs the vCPUs' writes itself there
    /// is nothing to drop (its vCPUs cache no write translations of the
    /// VMM's), and the wait is over at once.
    pub fn request_flush(&self) -> u64 {
        let g = self.flush_generation.fetch_add(1, Ordering::AcqRel) + 1;
        if self.engine.get().is_none() {
            self.flush_wanted.store(true, Ordering::Release);
        }
        g
    }

    /// Whether a flush is asked for (vCPUs leave guest code for it).
    #[inline]
    pub fn flush_wanted(&self) -> bool {
        self.flush_wanted.load(Ordering::Relaxed)
    }

    /// Called by vCPU `id` between slices: when a flush is due, `flush`
    /// runs and is acknowledged.
    pub fn vcpu_check(&self, id: usize, flush: impl FnOnce()) {
        let g = self.flush_generation.load(Ordering::Acquire);
        if let Some(done) = self.flushed.get(id) {
            if done.load(Ordering::Acquire) != g {
                flush();
                done.store(g, Ordering::Release);
            }
        }
    }

    /// Wait until vCPUs `0..cpus` have flushed for generation `g`; false
    /// when `timeout` passed first (or `gone` says the vCPUs ended).
    pub fn wait_flushed(&self, g: u64, cpus: usize, timeout: Duration, gone: &dyn Fn() -> bool) -> bool {
        if self.engine.get().is_some() {
            return true;
        }
        let start = Instant::now();
        loop {
            if self.flushed[..cpus.min(MAX_CPUS as usize)]
                .iter()
                .all(|d| d.load(Ordering::Acquire) >= g)
            {
                if self.flush_generation.load(Ordering::Acquire) == g {
                    self.flush_wanted.store(false, Ordering::Release);
                }
                return true;
            }
            if start.elapsed() > timeout || gone() {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn set_throttle(&self, percent: u8) {
        self.throttle_percent.store(percent.min(99), Ordering::Relaxed);
    }

    pub fn throttle(&self) -> u8 {
        self.throttle_percent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_while_enabled_and_harvest_clears() {
        let log = DirtyLog::default();
        log.mark(0x5000);
        assert!(log.harvest().unwrap().is_empty());
        log.enable(1 << 24).unwrap();
        log.mark(0x5123);
        log.mark_range(0x7fff, 2);
        log.mark(1 << 40); // outside: ignored
        assert_eq!(log.harvest().unwrap(), vec![0x5000, 0x7000, 0x8000]);
        assert!(log.harvest().unwrap().is_empty());
        log.disable();
        log.mark(0x1000);
        assert!(log.harvest().unwrap().is_empty());
    }

    /// An engine log that reports what the test put in it.
    #[derive(Default)]
    struct EngineLog {
        on: AtomicBool,
        pages: std::sync::Mutex<Vec<u64>>,
    }

    impl EngineDirtyLog for EngineLog {
        fn start(&self) -> Result<(), String> {
            self.on.store(true, Ordering::Release);
            Ok(())
        }
        fn collect(&self, mark: &mut dyn FnMut(u64)) -> Result<(), String> {
            self.pages.lock().unwrap().drain(..).for_each(mark);
            Ok(())
        }
        fn stop(&self) -> Result<(), String> {
            self.on.store(false, Ordering::Release);
            Ok(())
        }
    }

    #[test]
    fn engine_log_is_merged_and_needs_no_flush() {
        let log = DirtyLog::default();
        let engine = Arc::new(EngineLog::default());
        log.set_engine(engine.clone());
        log.enable(1 << 24).unwrap();
        assert!(engine.on.load(Ordering::Acquire));
        engine.pages.lock().unwrap().extend([0x9000, 0x3000]);
        log.mark_range(0x3000, 1); // a device wrote the same page
        log.mark(0x4000);
        assert_eq!(log.harvest().unwrap(), vec![0x3000, 0x4000, 0x9000]);
        assert!(log.harvest().unwrap().is_empty());
        let g = log.request_flush();
        assert!(!log.flush_wanted());
        assert!(log.wait_flushed(g, 2, Duration::ZERO, &|| false));
        log.disable();
        assert!(!engine.on.load(Ordering::Acquire));
    }

    #[test]
    fn flush_is_acknowledged_per_vcpu() {
        let log = DirtyLog::default();
        let g = log.request_flush();
        assert!(log.flush_wanted());
        assert!(!log.wait_flushed(g, 2, Duration::from_millis(5), &|| false));
        let mut flushes = 0;
        log.vcpu_check(0, || flushes += 1);
        log.vcpu_check(0, || flushes += 1);
        log.vcpu_check(1, || flushes += 1);
        assert_eq!(flushes, 2);
        assert!(log.wait_flushed(g, 2, Duration::from_millis(5), &|| false));
        assert!(!log.flush_wanted());
    }
}
