//! The source's side of a migration: cold (pause, send everything) or
//! live pre-copy (send all memory while the guest runs, then the pages it
//! dirtied since, round after round, until what is left fits the downtime
//! limit at the measured bandwidth; then pause and send the rest with the
//! machine state).
//!
//! The hand-over never leaves two running copies: the destination builds
//! the machine and answers `Prepared`; only then does the source send
//! `Commit` and stop for good. If anything fails before `Commit` went out
//! whole, the source resumes (when it was running before) and the
//! destination, which never got `Commit`, discards what it had.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::stream::{self, Hello, Message, PageBatchBuilder, StreamError, PAGE_SIZE};
use super::{MigrationInfo, Status};
use crate::machine::VmHandle;

/// How long the source waits for its vCPUs to stop at the switch.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a harvest waits for every vCPU to drop its write translations.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed migration's source tries to take its disks and TAPs
/// back (the destination lets go once it has discarded what it prepared).
const REATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// QEMU's auto-converge steps: start at 20%, add 10% each time.
const THROTTLE_FIRST: u8 = 20;
const THROTTLE_STEP: u8 = 10;
const THROTTLE_MAX: u8 = 99;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Cold,
    Live,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// Give up: the source runs on.
    Cancel,
    /// Switch over now, whatever the downtime.
    Switch,
}

#[derive(Clone, Debug)]
pub struct SendOptions {
    pub mode: Mode,
    pub downtime_limit: Duration,
    /// Bytes per second; `None` for no limit.
    pub max_bandwidth: Option<u64>,
    pub auto_converge: bool,
    pub timeout: Duration,
    pub timeout_action: TimeoutAction,
    /// Resume the VM when the migration fails (it was running before).
    pub resume_on_failure: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("cannot migrate: {0}")]
    Refused(String),
    #[error("cancelled")]
    Cancelled,
    #[error("timed out after {0} s without converging (timeout_action cancel)")]
    TimedOut(u64),
    #[error("the destination refused: {0}")]
    Destination(String),
}

/// What a committed migration measured.
#[derive(Clone, Debug)]
pub struct SendOutcome {
    /// As the destination measured it (None if its report did not come).
    pub downtime_ms: Option<u64>,
    pub transferred_bytes: u64,
    pub iterations: u64,
    pub total_time: Duration,
}

/// The figures, shared with whoever reports them (`GET /migration`).
pub type SharedInfo = Mutex<MigrationInfo>;

fn update(info: &SharedInfo, f: impl FnOnce(&mut MigrationInfo)) {
    f(&mut info.lock().unwrap_or_else(|e| e.into_inner()));
}

/// Counts bytes and keeps to the bandwidth limit.
struct Link<'a, W: Write> {
    w: W,
    sent: u64,
    start: Instant,
    limit: Option<u64>,
    info: &'a SharedInfo,
}

impl<W: Write> Link<'_, W> {
    fn account(&mut self, n: u64) {
        self.sent += n;
        update(self.info, |i| i.transferred_bytes = self.sent);
        if let Some(rate) = self.limit.filter(|&r| r > 0) {
            let due = Duration::from_secs_f64(self.sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Run the source's side over a connected stream (`reader` and `writer`
/// are the two directions of it). On success the VM is paused for good
/// and the caller ends it; on failure it runs again (if it ran before).
pub fn send(
    vm: &VmHandle,
    reader: &mut impl Read,
    writer: impl Write,
    opts: &SendOptions,
    info: &SharedInfo,
    cancel: &AtomicBool,
) -> Result<SendOutcome, SendError> {
    let start = Instant::now();
    let mut paused = false;
    let mut committed = false;
    let mut result = run(
        vm,
        reader,
        writer,
        opts,
        info,
        cancel,
        start,
        &mut paused,
        &mut committed,
    );
    vm.dirty_log().disable();
    if result.is_err() && !committed && vm.backends_released() {
        // The destination may still hold a disk or the TAP until it has
        // discarded what it prepared: try a while.
        if let Err(e) = vm.reattach_backends(REATTACH_TIMEOUT) {
            let why = result.err().map(|e| e.to_string()).unwrap_or_default();
            result = Err(SendError::Refused(format!("{why}; and {e}: the VM stays paused")));
        }
    }
    if result.is_err() && paused && !committed && opts.resume_on_failure && !vm.backends_released() {
        vm.resume();
    }
    let status = match &result {
        Ok(_) => Status::Completed,
        Err(SendError::Cancelled) | Err(SendError::TimedOut(_)) => Status::Cancelled,
        Err(_) => Status::Failed,
    };
    update(info, |i| {
        i.status = status;
        i.total_time_ms = start.elapsed().as_millis() as u64;
        i.throttle_percent = 0;
        if let Err(e) = &result {
            i.error = Some(e.to_string());
        }
        if let Ok(o) = &result {
            i.downtime_ms = o.downtime_ms;
            i.remaining_bytes = 0;
        }
    });
    result
}

#[allow(clippy::too_many_arguments)]
fn run(
    vm: &VmHandle,
    reader: &mut impl Read,
    writer: impl Write,
    opts: &SendOptions,
    info: &SharedInfo,
    cancel: &AtomicBool,
    start: Instant,
    paused: &mut bool,
    committed: &mut bool,
) -> Result<SendOutcome, SendError> {
    let mem = vm.guest_memory();
    let cfg = vm.config().clone();
    let mut link = Link {
        w: std::io::BufWriter::with_capacity(1 << 20, writer),
        sent: 0,
        start,
        limit: opts.max_bandwidth,
        info,
    };
    let n = stream::write_header(&mut link.w)?;
    link.account(n);
    let n = stream::write_message(
        &mut link.w,
        &Message::Hello(Hello {
            vessel_version: env!("CARGO_PKG_VERSION").into(),
            mem_size: cfg.mem_size,
            cpus: cfg.cpus,
        }),
    )?;
    link.account(n);
    update(info, |i| {
        i.status = Status::Active;
        i.total_bytes = cfg.mem_size;
    });
    let all_pages: Vec<u64> = ram_pages(&mem).collect();
    let mut iterations = 0u64;
    let mut pending: Vec<u64> = all_pages;
    let paused_at;
    if opts.mode == Mode::Live {
        let log = vm.dirty_log();
        log.enable(mem.last_addr().0 + 1).map_err(SendError::Refused)?;
        flush_all(vm)?;
        let mut throttle = 0u8;
        let mut not_shrinking = 0;
        loop {
            // Send this round's pages while the guest runs.
            let round_start = Instant::now();
            let sent_before = link.sent;
            // A timeout that cancels cuts a round short; one that switches
            // waits for the round's end (its pages are needed anyway).
            let deadline = (opts.timeout_action == TimeoutAction::Cancel).then(|| start + opts.timeout);
            send_pages(&mut link, &mem, &pending, cancel, deadline)?;
            link.w.flush().map_err(StreamError::from)?;
            iterations += 1;
            let round_time = round_start.elapsed().max(Duration::from_millis(1));
            let bandwidth = ((link.sent - sent_before) as f64 / round_time.as_secs_f64()).max(1.0);
            // What the guest dirtied meanwhile.
            pending = log.harvest().map_err(SendError::Refused)?;
            flush_all(vm)?;
            let remaining = pending.len() as u64 * PAGE_SIZE;
            let expected = Duration::from_secs_f64(remaining as f64 / bandwidth);
            let dirty_rate = (remaining as f64 / round_time.as_secs_f64()) as u64;
            update(info, |i| {
                i.iterations = iterations;
                i.remaining_bytes = remaining;
                i.expected_downtime_ms = expected.as_millis() as u64;
                i.dirty_rate_bytes_per_s = dirty_rate;
                i.total_time_ms = start.elapsed().as_millis() as u64;
            });
            tracing::info!(
                "migration round {iterations}: {} KiB dirty, {:.1} MB/s, expected downtime {} ms, throttle {throttle}%",
                remaining >> 10,
                bandwidth / 1e6,
                expected.as_millis()
            );
            if expected <= opts.downtime_limit {
                break;
            }
            if cancel.load(Ordering::Acquire) {
                return Err(give_up(&mut link, SendError::Cancelled));
            }
            if start.elapsed() >= opts.timeout {
                match opts.timeout_action {
                    TimeoutAction::Cancel => {
                        return Err(give_up(&mut link, SendError::TimedOut(opts.timeout.as_secs())))
                    }
                    TimeoutAction::Switch => break,
                }
            }
            // Auto-converge (QEMU's rule): when the guest dirties half of
            // what a round sent, two rounds running, throttle harder.
            if remaining * 2 >= link.sent - sent_before {
                not_shrinking += 1;
            } else {
                not_shrinking = 0;
            }
            if opts.auto_converge && not_shrinking >= 2 {
                throttle = if throttle == 0 {
                    THROTTLE_FIRST
                } else {
                    (throttle + THROTTLE_STEP).min(THROTTLE_MAX)
                };
                log.set_throttle(throttle);
                update(info, |i| i.throttle_percent = throttle);
                not_shrinking = 0;
            }
        }
        if !vm.pause(PAUSE_TIMEOUT) {
            return Err(SendError::Refused("the vCPUs did not stop for the switch".into()));
        }
        *paused = true;
        paused_at = SystemTime::now();
        // Paused: nothing writes guest memory any more. The used rings
        // go again whole: device writes to them bypass the dirty log.
        vm.mark_used_rings_dirty();
        pending.extend(log.harvest().map_err(SendError::Refused)?);
        pending.sort_unstable();
        pending.dedup();
        log.disable();
    } else {
        if !vm.pause(PAUSE_TIMEOUT) {
            return Err(SendError::Refused("the vCPUs did not stop".into()));
        }
        *paused = true;
        paused_at = SystemTime::now();
    }
    update(info, |i| i.remaining_bytes = pending.len() as u64 * PAGE_SIZE);
    send_pages(&mut link, &mem, &pending, cancel, None)?;
    iterations += 1;
    let mut state = vm
        .save_state()
        .map_err(|e| SendError::Refused(format!("saving the machine state: {e}")))?;
    // The destination opens the same TAP and keeps the MAC the guest knows
    // (the configuration may have left either to chance).
    for (net, id) in state.config.nets.iter_mut().zip(vm.net_identities()) {
        net.tap = Some(id.tap);
        net.mac = Some(id.mac);
    }
    // Hand over the host resources: disks made durable and closed (their
    // locks with them), TAPs closed, so that the destination, which
    // builds the machine once the state below arrives, can open them.
    // Until `commit` went out whole, a failure takes them back.
    vm.release_backends()
        .map_err(|e| SendError::Refused(format!("handing the disks and TAPs over: {e}")))?;
    let n = stream::write_message(&mut link.w, &Message::State(Box::new(state)))?;
    link.account(n);
    link.w.flush().map_err(StreamError::from)?;
    update(info, |i| {
        i.iterations = iterations;
        i.remaining_bytes = 0;
    });
    // The destination builds the machine; until it says so, we may resume.
    match stream::read_message(reader)? {
        Message::Prepared => {}
        Message::Error(e) => return Err(SendError::Destination(e)),
        m => {
            return Err(StreamError::Unexpected {
                got: m.name(),
                expected: "prepared",
            }
            .into())
        }
    }
    if cancel.load(Ordering::Acquire) {
        return Err(give_up(&mut link, SendError::Cancelled));
    }
    let paused_at_unix_ns = paused_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = stream::write_message(
        &mut link.w,
        &Message::Commit {
            paused_at_unix_ns,
            iterations,
        },
    )?;
    link.w.flush().map_err(StreamError::from)?;
    // The whole commit went out: the destination runs the guest now, so
    // this side never resumes, whatever comes next.
    *committed = true;
    link.account(n);
    let downtime_ms = match stream::read_message(reader) {
        Ok(Message::Running { downtime_ms }) => Some(downtime_ms),
        Ok(m) => {
            tracing::warn!("migration: the destination answered {} after commit", m.name());
            None
        }
        Err(e) => {
            tracing::warn!("migration: no report from the destination after commit: {e}");
            None
        }
    };
    Ok(SendOutcome {
        downtime_ms,
        transferred_bytes: link.sent,
        iterations,
        total_time: start.elapsed(),
    })
}

/// Every page of guest RAM.
fn ram_pages(mem: &GuestMemoryMmap) -> impl Iterator<Item = u64> + '_ {
    mem.iter().flat_map(|r| {
        let start = r.start_addr().0;
        (0..r.len() / PAGE_SIZE).map(move |i| start + i * PAGE_SIZE)
    })
}

fn send_pages<W: Write>(
    link: &mut Link<'_, W>,
    mem: &GuestMemoryMmap,
    pages: &[u64],
    cancel: &AtomicBool,
    deadline: Option<Instant>,
) -> Result<(), SendError> {
    let mut batch = PageBatchBuilder::default();
    let mut buf = [0u8; PAGE_SIZE as usize];
    let total = pages.len() as u64;
    for (i, &gpa) in pages.iter().enumerate() {
        mem.read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|e| StreamError::Memory(format!("reading page {gpa:#x}: {e}")))?;
        batch.push(gpa, &buf);
        if batch.is_full() {
            let n = batch.flush(&mut link.w)?;
            link.account(n);
            update(link.info, |info| {
                info.remaining_bytes = (total - i as u64 - 1) * PAGE_SIZE
            });
            if cancel.load(Ordering::Acquire) {
                return Err(give_up(link, SendError::Cancelled));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let secs = d_secs(link.start, deadline);
                return Err(give_up(link, SendError::TimedOut(secs)));
            }
        }
    }
    let n = batch.flush(&mut link.w)?;
    link.account(n);
    Ok(())
}

/// Tell the destination why we stop (at a message boundary), so it
/// reports that rather than a closed stream.
fn give_up<W: Write>(link: &mut Link<'_, W>, e: SendError) -> SendError {
    let _ = stream::write_message(&mut link.w, &Message::Error(format!("the source gave up: {e}")));
    let _ = link.w.flush();
    e
}

fn d_secs(start: Instant, deadline: Option<Instant>) -> u64 {
    deadline.map_or(0, |d| d.saturating_duration_since(start).as_secs())
}

/// Have every vCPU drop its cached write translations, so that the next
/// write to any page is marked.
fn flush_all(vm: &VmHandle) -> Result<(), SendError> {
    let log = vm.dirty_log();
    let g = log.request_flush();
    vm.kick_vcpus();
    if !log.wait_flushed(g, vm.config().cpus as usize, FLUSH_TIMEOUT, &|| vm.stopped()) {
        return Err(SendError::Refused(if vm.stopped() {
            "the VM stopped during the migration".into()
        } else {
            "the vCPUs did not answer the dirty-page flush".into()
        }));
    }
    Ok(())
}
