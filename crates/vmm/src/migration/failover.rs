//! Failover (docs/FAILOVER.md): continuous checkpoints from a primary to a
//! standby, Remus-style. The initial sync is a migration stream (header,
//! hello, pages, state) that never switches over; after it come failover
//! frames, each one whole epoch of migration messages (the pages dirtied
//! since the last epoch, then the state) under one checksum, so the
//! standby applies an epoch only when all of it came and matched.
//!
//! Frame (all integers little-endian): type `u8`, 3 reserved zero bytes,
//! epoch `u64`, payload length `u64` (bounded per type, and for an epoch
//! by the guest's size), the payload, then a CRC-64/ECMA-182 of all
//! before it.
//!
//! [`OutputGate`] holds what the guest writes to its serial port until the
//! epoch that wrote it is acknowledged (the output-commit rule).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::stream::{self, Message, PageBatch, PageBatchBuilder, StreamError, PAGE_SIZE};
use crate::machine::VmHandle;
use crate::persist::MachineState;
pub use crate::virtio::epoch_overlay::{DiskOp, EPOCH_WRITE_LIMIT};

const FRAME_HEADER_LEN: usize = 24;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);
/// Bound of the small frames' payloads (config JSON, error text).
const SMALL_MAX: u64 = 4096;

/// Failover frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Primary → standby, first: the protection's timing (JSON [`Timing`]).
    Config = 1,
    /// Primary → standby: one epoch (migration messages: pages, then state).
    Epoch = 2,
    /// Standby → primary: the epoch is applied.
    Ack = 3,
    /// Either way: alive (the standby answers each with one).
    Heartbeat = 4,
    /// Either way: the sender gives up, and why (UTF-8).
    Error = 5,
    /// Primary → standby: protection ends on purpose (the VM stopped);
    /// do not take over.
    End = 6,
    /// Standby → primary: the standby takes over now (forced); the
    /// primary must stop (it fences itself).
    Takeover = 7,
    /// Primary → standby, just before the epoch of the same number: the
    /// disk writes the guest made in it ([`DiskWrites`]). Kept only if
    /// that epoch is applied.
    DiskWrites = 8,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<FrameKind> {
        Some(match b {
            1 => FrameKind::Config,
            2 => FrameKind::Epoch,
            3 => FrameKind::Ack,
            4 => FrameKind::Heartbeat,
            5 => FrameKind::Error,
            6 => FrameKind::End,
            7 => FrameKind::Takeover,
            8 => FrameKind::DiskWrites,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Config => "config",
            FrameKind::Epoch => "epoch",
            FrameKind::Ack => "ack",
            FrameKind::Heartbeat => "heartbeat",
            FrameKind::Error => "error",
            FrameKind::End => "end",
            FrameKind::Takeover => "takeover",
            FrameKind::DiskWrites => "disk-writes",
        }
    }
}

/// The protection's timing, sent to the standby first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    pub epoch_ms: u64,
    pub heartbeat_ms: u64,
    pub timeout_ms: u64,
}

/// One checked frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub epoch: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("failover stream: unknown frame type {0}")]
    UnknownType(u8),
    #[error("failover stream: a {kind} frame of {len} bytes, more than its limit of {max}")]
    TooLong { kind: &'static str, len: u64, max: u64 },
    #[error("failover stream: checksum mismatch in the {0} frame of epoch {1}: the stream is corrupt")]
    Checksum(&'static str, u64),
    #[error("failover stream: malformed {0}: {1}")]
    Malformed(&'static str, String),
    #[error("the peer gave up: {0}")]
    Peer(String),
    #[error("failover: {0}")]
    Vm(String),
}

/// Write one frame; the bytes written.
pub fn write_frame(w: &mut impl Write, kind: FrameKind, epoch: u64, payload: &[u8]) -> std::io::Result<u64> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    head[0] = kind as u8;
    head[4..12].copy_from_slice(&epoch.to_le_bytes());
    head[12..20].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    // Bytes 20..24 reserved (zero).
    let mut digest = CRC.digest();
    digest.update(&head);
    digest.update(payload);
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.write_all(&digest.finalize().to_le_bytes())?;
    Ok((FRAME_HEADER_LEN + payload.len() + 8) as u64)
}

/// The largest epoch a guest of `mem_size` bytes can need: every page
/// with its data, the batches' framing, and the largest state.
pub fn max_epoch_len(mem_size: u64) -> u64 {
    let pages = mem_size / PAGE_SIZE;
    let batches = pages.div_ceil(stream::MAX_PAGES_PER_MESSAGE as u64) + 1;
    pages * (8 + PAGE_SIZE) + batches * (4 + 16) + crate::persist::MAX_PAYLOAD + 32 + 16
}

/// The largest disk-writes frame next to epochs of at most `max_epoch`
/// bytes: an epoch's writes stop at [`EPOCH_WRITE_LIMIT`] but for the
/// requests in flight when the checkpoint pauses, which the guest's
/// memory bounds.
pub fn max_disk_writes_len(max_epoch: u64) -> u64 {
    max_epoch.saturating_add(2 * EPOCH_WRITE_LIMIT)
}

/// One epoch's disk writes, as the standby receives them.
#[derive(Debug, PartialEq, Eq)]
pub struct DiskWrites {
    /// The primary has written every epoch up to this one to the images
    /// (the standby may forget their writes).
    pub committed_through: u64,
    /// (disk index in the machine's configuration, write), in order.
    pub ops: Vec<(u32, DiskOp)>,
}

const OP_WRITE: u8 = 1;
const OP_ZERO: u8 = 2;
/// The largest zeroed range one op may name (a disk of 1 PiB).
const MAX_ZERO_LEN: u64 = 1 << 50;

/// A disk-writes payload: `committed_through` u64, then per write: disk
/// u32, kind u8 (1 data, 2 zeroes), 3 zero bytes, offset u64, length u64,
/// and for data the bytes.
pub fn encode_disk_writes(committed_through: u64, disks: &[(u32, Vec<DiskOp>)]) -> Vec<u8> {
    let mut out = committed_through.to_le_bytes().to_vec();
    for (disk, ops) in disks {
        for op in ops {
            out.extend_from_slice(&disk.to_le_bytes());
            match op {
                DiskOp::Write { offset, data } => {
                    out.extend_from_slice(&[OP_WRITE, 0, 0, 0]);
                    out.extend_from_slice(&offset.to_le_bytes());
                    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
                    out.extend_from_slice(data);
                }
                DiskOp::Zero { offset, len } => {
                    out.extend_from_slice(&[OP_ZERO, 0, 0, 0]);
                    out.extend_from_slice(&offset.to_le_bytes());
                    out.extend_from_slice(&len.to_le_bytes());
                }
            }
        }
    }
    out
}

/// Check a disk-writes payload: every write names one of the machine's
/// `disks`, a range that does not overflow, and for data, bytes that are
/// there. The disks' sizes are checked when the writes are carried out.
pub fn parse_disk_writes(payload: &[u8], disks: usize) -> Result<DiskWrites, FailoverError> {
    let bad = |why: String| FailoverError::Malformed("disk-writes", why);
    let take = |r: &mut &[u8], n: usize| -> Result<Vec<u8>, FailoverError> {
        if r.len() < n {
            return Err(FailoverError::Malformed("disk-writes", "cut short".into()));
        }
        let (a, b) = r.split_at(n);
        *r = b;
        Ok(a.to_vec())
    };
    let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let mut r = payload;
    let committed_through = u64_of(&take(&mut r, 8)?);
    let mut ops = Vec::new();
    while !r.is_empty() {
        let head = take(&mut r, 24)?;
        let disk = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        if disk as usize >= disks {
            return Err(bad(format!("a write to disk {disk} of a machine with {disks}")));
        }
        if head[5..8] != [0; 3] {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let offset = u64_of(&head[8..16]);
        let len = u64_of(&head[16..24]);
        if offset.checked_add(len).is_none() {
            return Err(bad(format!("a write of {len} bytes at {offset:#x} overflows")));
        }
        let op = match head[4] {
            OP_WRITE => {
                if len > r.len() as u64 {
                    return Err(bad(format!("a write of {len} bytes with {} left", r.len())));
                }
                DiskOp::Write {
                    offset,
                    data: take(&mut r, len as usize)?,
                }
            }
            OP_ZERO if len <= MAX_ZERO_LEN => DiskOp::Zero { offset, len },
            OP_ZERO => return Err(bad(format!("zeroes over {len} bytes"))),
            k => return Err(bad(format!("unknown write kind {k}"))),
        };
        ops.push((disk, op));
    }
    Ok(DiskWrites { committed_through, ops })
}

/// At takeover, before the guest resumes: carry out the held writes of
/// the applied epochs on the machine's disk images (idempotent with
/// whatever the primary wrote of them) and make them durable. Fails while
/// another process holds an image's lock (the primary not yet gone).
pub fn write_held_disk_ops(cfg: &crate::machine::MachineConfig, ops: &[(u32, DiskOp)]) -> Result<(), String> {
    let mut open: Vec<Option<Box<dyn disk::BlockBackend>>> = (0..cfg.disks.len()).map(|_| None).collect();
    for (i, op) in ops {
        let d = cfg
            .disks
            .get(*i as usize)
            .ok_or_else(|| format!("a held write to disk {i}, which the machine does not have"))?;
        if open[*i as usize].is_none() {
            let b = d.open().map_err(|e| format!("disk {e}"))?;
            open[*i as usize] = Some(b);
        }
        let b = open[*i as usize].as_deref().expect("opened above");
        let (offset, len) = match op {
            DiskOp::Write { offset, data } => (*offset, data.len() as u64),
            DiskOp::Zero { offset, len } => (*offset, *len),
        };
        if offset.checked_add(len).is_none_or(|end| end > b.size()) {
            return Err(format!(
                "a held write of {len} bytes at {offset:#x} lies outside disk {i} ({})",
                d.path.display()
            ));
        }
        op.apply(b)
            .map_err(|e| format!("writing to {}: {e}", d.path.display()))?;
    }
    for (i, b) in open.iter().enumerate() {
        if let Some(b) = b {
            b.flush()
                .map_err(|e| format!("flushing {}: {e}", cfg.disks[i].path.display()))?;
        }
    }
    Ok(())
}

/// Read one frame, checked; `max_epoch` bounds an epoch's payload. The
/// payload grows only as its bytes arrive, so a lying length allocates
/// no more than the peer really sent.
pub fn read_frame(r: &mut impl Read, max_epoch: u64) -> Result<Frame, FailoverError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    read_exact_or(r, &mut head, "frame", true)?;
    let kind = FrameKind::from_u8(head[0]).ok_or(FailoverError::UnknownType(head[0]))?;
    if head[1..4] != [0; 3] || head[20..24] != [0; 4] {
        return Err(FailoverError::Malformed(
            kind.name(),
            "reserved bytes are not zero".into(),
        ));
    }
    let epoch = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
    let max = match kind {
        FrameKind::Epoch => max_epoch,
        FrameKind::DiskWrites => max_disk_writes_len(max_epoch),
        FrameKind::Config | FrameKind::Error => SMALL_MAX,
        FrameKind::Ack | FrameKind::Heartbeat | FrameKind::End | FrameKind::Takeover => 0,
    };
    if len > max {
        return Err(FailoverError::TooLong {
            kind: kind.name(),
            len,
            max,
        });
    }
    let mut payload = Vec::new();
    let got = r
        .take(len)
        .read_to_end(&mut payload)
        .map_err(|e| FailoverError::Stream(e.into()))?;
    if got as u64 != len {
        return Err(StreamError::Truncated(kind.name()).into());
    }
    let mut crc = [0u8; 8];
    read_exact_or(r, &mut crc, kind.name(), false)?;
    let mut digest = CRC.digest();
    digest.update(&head);
    digest.update(&payload);
    if digest.finalize() != u64::from_le_bytes(crc) {
        return Err(FailoverError::Checksum(kind.name(), epoch));
    }
    Ok(Frame { kind, epoch, payload })
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &'static str, at_boundary: bool) -> Result<(), StreamError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 && at_boundary => return Err(StreamError::Closed),
            Ok(0) => return Err(StreamError::Truncated(what)),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// An epoch's payload, checked whole and not yet applied.
pub struct CheckedEpoch {
    batches: Vec<PageBatch>,
    pub state: MachineState,
}

impl CheckedEpoch {
    pub fn pages(&self) -> usize {
        self.batches.iter().map(|b| b.len()).sum()
    }
}

/// Check an epoch's payload against the standby's memory and machine:
/// page batches, then exactly one state, last; every page inside guest
/// RAM; the state of the same machine. Nothing is written.
pub fn check_epoch(
    payload: &[u8],
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cpus: u32,
) -> Result<CheckedEpoch, FailoverError> {
    let mut r = payload;
    let mut batches = Vec::new();
    loop {
        match stream::read_message(&mut r)? {
            Message::Pages(b) => {
                for (gpa, _) in b.pages() {
                    if !GuestMemoryBackend::check_range(mem, GuestAddress(gpa), PAGE_SIZE as usize) {
                        return Err(FailoverError::Malformed(
                            "epoch",
                            format!("page {gpa:#x} is outside guest memory"),
                        ));
                    }
                }
                batches.push(b);
            }
            Message::State(state) => {
                if !r.is_empty() {
                    return Err(FailoverError::Malformed(
                        "epoch",
                        format!("{} bytes after the state", r.len()),
                    ));
                }
                if state.config.mem_size != mem_size || state.config.cpus != cpus {
                    return Err(FailoverError::Malformed(
                        "epoch",
                        "the state is of another machine than the initial sync's".into(),
                    ));
                }
                return Ok(CheckedEpoch { batches, state: *state });
            }
            m => {
                return Err(FailoverError::Malformed(
                    "epoch",
                    format!("a {} message inside an epoch", m.name()),
                ))
            }
        }
    }
}

/// Write a checked epoch's pages into guest memory; the state is the
/// caller's to keep.
pub fn apply_epoch(mem: &GuestMemoryMmap, epoch: CheckedEpoch) -> Result<MachineState, FailoverError> {
    for b in &epoch.batches {
        stream::apply_pages(mem, b)?;
    }
    Ok(epoch.state)
}

/// The fuzz target's entry: a standby's reader over arbitrary bytes, with
/// 32 MiB of guest memory and two disks: frames, each epoch checked and
/// applied, each disk-writes frame parsed.
pub fn fuzz_standby(data: &[u8]) {
    let size = crate::memory::MIN_MEM;
    let Ok(mem) = crate::memory::create(size) else { return };
    let mut r = data;
    while let Ok(f) = read_frame(&mut r, max_epoch_len(size)) {
        match f.kind {
            FrameKind::Epoch => {
                if let Ok(e) = check_epoch(&f.payload, &mem, size, 1) {
                    let _ = apply_epoch(&mem, e);
                }
            }
            FrameKind::DiskWrites => {
                if let Ok(w) = parse_disk_writes(&f.payload, 2) {
                    // Round trip: what was accepted encodes back the same.
                    let mut by_disk: Vec<(u32, Vec<DiskOp>)> = Vec::new();
                    for (d, op) in w.ops.iter().cloned() {
                        by_disk.push((d, vec![op]));
                    }
                    assert_eq!(encode_disk_writes(w.committed_through, &by_disk), f.payload);
                }
            }
            _ => {}
        }
    }
}

/// What one epoch's capture took.
pub struct Capture {
    /// The epoch's payload: pages messages, then the state message.
    pub payload: Vec<u8>,
    pub pages: usize,
    /// How long the guest was paused.
    pub pause: Duration,
}

const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Start tracking dirty pages for protection (every vCPU drops its cached
/// write translations first).
pub fn start_tracking(vm: &VmHandle) -> Result<(), FailoverError> {
    let mem = vm.guest_memory();
    vm.dirty_log()
        .enable(mem.last_addr().0 + 1)
        .map_err(FailoverError::Vm)?;
    flush(vm, vm.dirty_log().request_flush())
}

fn flush(vm: &VmHandle, g: u64) -> Result<(), FailoverError> {
    vm.kick_vcpus();
    let log = vm.dirty_log();
    if !log.wait_flushed(g, vm.config().cpus as usize, FLUSH_TIMEOUT, &|| vm.stopped()) {
        return Err(FailoverError::Vm(if vm.stopped() {
            "the VM stopped".into()
        } else {
            "the vCPUs did not answer the dirty-page flush".into()
        }));
    }
    Ok(())
}

/// One epoch: pause the VM (vCPUs and device workers), copy the pages
/// dirtied since the last harvest and the machine state into a buffer,
/// run `while_paused` (the output gate's epoch mark), resume. Sending is
/// the caller's, after the resume: the pause stays as short as a copy.
pub fn capture(vm: &VmHandle, while_paused: impl FnOnce()) -> Result<Capture, FailoverError> {
    let mem = vm.guest_memory();
    let start = Instant::now();
    if !vm.pause(PAUSE_TIMEOUT) {
        vm.resume();
        return Err(FailoverError::Vm("the vCPUs did not stop for the checkpoint".into()));
    }
    let log = vm.dirty_log();
    // Devices write their used rings through the queue code, which the
    // dirty log does not hear: every epoch carries them whole (they are
    // small), as migration's switch does.
    vm.mark_used_rings_dirty();
    let pages = match log.harvest() {
        Ok(pages) => pages,
        Err(e) => {
            vm.resume();
            return Err(FailoverError::Vm(e));
        }
    };
    // Every vCPU drops its write translations before it runs guest code
    // again (it checks between slices, and it is parked now), so every
    // later write is marked.
    let g = log.request_flush();
    let result = (|| {
        let mut payload = Vec::with_capacity(pages.len() * (PAGE_SIZE as usize + 8) + (64 << 10));
        let mut batch = PageBatchBuilder::default();
        let mut buf = [0u8; PAGE_SIZE as usize];
        for &gpa in &pages {
            mem.read_slice(&mut buf, GuestAddress(gpa))
                .map_err(|e| StreamError::Memory(format!("reading page {gpa:#x}: {e}")))?;
            batch.push(gpa, &buf);
            if batch.is_full() {
                batch.flush(&mut payload)?;
            }
        }
        batch.flush(&mut payload)?;
        let state = vm
            .save_state()
            .map_err(|e| FailoverError::Vm(format!("saving the machine state: {e}")))?;
        stream::write_message(&mut payload, &Message::State(Box::new(state)))?;
        Ok::<_, FailoverError>(payload)
    })();
    if result.is_ok() {
        while_paused();
    }
    vm.resume();
    let pause = start.elapsed();
    let payload = result?;
    flush(vm, g)?;
    Ok(Capture {
        payload,
        pages: pages.len(),
        pause,
    })
}

/// The initial sync's first pass: every page of guest RAM as it is now
/// (the guest runs on; what it dirties meanwhile goes in epoch 0). The
/// bytes written; `progress` is told the total after each batch.
pub fn send_all_pages(vm: &VmHandle, w: &mut impl Write, progress: &mut dyn FnMut(u64)) -> Result<u64, StreamError> {
    let mem = vm.guest_memory();
    let mut batch = PageBatchBuilder::default();
    let mut buf = [0u8; PAGE_SIZE as usize];
    let mut sent = 0;
    for r in mem.iter() {
        let start = r.start_addr().0;
        for i in 0..r.len() / PAGE_SIZE {
            let gpa = start + i * PAGE_SIZE;
            mem.read_slice(&mut buf, GuestAddress(gpa))
                .map_err(|e| StreamError::Memory(format!("reading page {gpa:#x}: {e}")))?;
            batch.push(gpa, &buf);
            if batch.is_full() {
                sent += batch.flush(w)?;
                progress(sent);
            }
        }
    }
    sent += batch.flush(w)?;
    Ok(sent)
}

/// Median and 99th percentile of the last pauses, in ms.
#[derive(Default)]
pub struct PauseStats {
    last: VecDeque<f64>,
}

impl PauseStats {
    const KEEP: usize = 1024;

    pub fn add(&mut self, d: Duration) {
        if self.last.len() == Self::KEEP {
            self.last.pop_front();
        }
        self.last.push_back(d.as_secs_f64() * 1e3);
    }

    /// (median, p99), 0 when empty.
    pub fn summary(&self) -> (f64, f64) {
        if self.last.is_empty() {
            return (0.0, 0.0);
        }
        let mut v: Vec<f64> = self.last.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.99))
    }
}

/// Held output bytes at most: a writer that would go over waits (the
/// guest's output stalls) until an acknowledgement releases some, the
/// next checkpoint's pause lets it through, or protection ends.
pub const OUTPUT_HELD_LIMIT: u64 = 32 << 20;

/// Output commit: what the guest sends to the outside world (its serial
/// console's bytes, its network frames) is held here while the VM is
/// protected and released, in the order the guest produced it, when the
/// epoch that produced it is acknowledged. Unprotected, it passes straight
/// through.
pub struct OutputGate {
    inner: Mutex<Gate>,
    /// Signalled when held output went out or a writer may go on anyway.
    room: Condvar,
    limit: u64,
}

/// A device's way out to the world (a virtio-console's output file), for
/// output the gate held.
pub trait OutputSink: Send + Sync {
    fn emit(&self, data: &[u8]);
}

/// Where one piece of held output goes.
enum Sink {
    /// The serial console.
    Console,
    /// A network frame, for this TAP.
    Frame(Arc<crate::virtio::tap::Tap>),
    /// A device's byte stream.
    Stream(Arc<dyn OutputSink>),
}

struct Chunk {
    sink: Sink,
    data: Vec<u8>,
}

struct Gate {
    out: Option<Box<dyn Write + Send>>,
    holding: bool,
    /// Never release again (the primary fenced itself).
    fenced: bool,
    held: VecDeque<Chunk>,
    held_bytes: u64,
    /// Chunks released or dropped before `held`'s first.
    base: u64,
    /// (epoch, end of its output as a chunk count), oldest first.
    marks: VecDeque<(u64, u64)>,
    /// A checkpoint's pause is coming: no writer waits for room now (a
    /// vCPU or device worker waiting here would hold the pause up).
    pausing: bool,
}

impl Default for OutputGate {
    fn default() -> Self {
        Self::with_limit(OUTPUT_HELD_LIMIT)
    }
}

impl OutputGate {
    /// A gate that holds at most `limit` bytes (see [`OUTPUT_HELD_LIMIT`]).
    pub fn with_limit(limit: u64) -> Self {
        OutputGate {
            room: Condvar::new(),
            limit,
            inner: Mutex::new(Gate {
                out: None,
                holding: false,
                fenced: false,
                held: VecDeque::new(),
                held_bytes: 0,
                base: 0,
                marks: VecDeque::new(),
                pausing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gate, once `n` more bytes fit under the bound (or need not:
    /// nothing held, not holding, fenced, a pause coming).
    fn lock_with_room(&self, n: usize) -> std::sync::MutexGuard<'_, Gate> {
        let mut g = self.lock();
        while g.holding && !g.fenced && !g.pausing && g.held_bytes > 0 && g.held_bytes + n as u64 > self.limit {
            g = self.room.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g
    }

    /// Set around a checkpoint's pause: writers waiting for room go on
    /// (by at most one write each over the bound), so that the vCPUs and
    /// device workers can stop.
    pub fn set_pausing(&self, on: bool) {
        self.lock().pausing = on;
        if on {
            self.room.notify_all();
        }
    }

    /// A writer for the machine's console, going to `out` through the gate.
    pub fn writer(self: &Arc<Self>, out: Box<dyn Write + Send>) -> Box<dyn Write + Send> {
        let mut g = self.lock();
        g.out = Some(out);
        Box::new(GateWriter(self.clone()))
    }

    /// A network frame the guest transmits on `tap`: written at once, or
    /// held until its epoch is acknowledged.
    pub fn send_frame(&self, tap: &Arc<crate::virtio::tap::Tap>, frame: &[u8]) -> std::io::Result<()> {
        let mut g = self.lock_with_room(frame.len());
        if g.holding {
            g.push(Sink::Frame(tap.clone()), frame);
            return Ok(());
        }
        drop(g);
        tap.write_frame(frame).map(|_| ())
    }

    /// Bytes a device sends to `sink`: passed at once, or held until
    /// their epoch is acknowledged.
    pub fn send_to(&self, sink: &Arc<dyn OutputSink>, data: &[u8]) {
        let mut g = self.lock_with_room(data.len());
        if g.holding {
            g.push(Sink::Stream(sink.clone()), data);
            return;
        }
        drop(g);
        sink.emit(data);
    }

    /// Start holding output (protection begins).
    pub fn hold(&self) {
        let mut g = self.lock();
        g.holding = true;
        g.fenced = false;
    }

    /// The guest's output so far belongs to `epoch` (called while paused).
    pub fn mark(&self, epoch: u64) {
        let mut g = self.lock();
        let end = g.base + g.held.len() as u64;
        g.marks.push_back((epoch, end));
    }

    /// `epoch` is acknowledged: release its output (and older epochs').
    pub fn release(&self, epoch: u64) {
        let mut g = self.lock();
        if g.fenced {
            return;
        }
        let mut end = None;
        while g.marks.front().is_some_and(|&(e, _)| e <= epoch) {
            end = g.marks.pop_front().map(|(_, o)| o);
        }
        if let Some(end) = end {
            let n = (end - g.base) as usize;
            g.emit(n);
            self.room.notify_all();
        }
    }

    /// Protection ends with nobody to take over (the standby died):
    /// release everything and pass through from now on.
    pub fn release_all(&self) {
        let mut g = self.lock();
        g.holding = false;
        g.fenced = false;
        g.marks.clear();
        let n = g.held.len();
        g.emit(n);
        self.room.notify_all();
    }

    /// The link is gone and the standby may run the guest now: never
    /// release what is held (until [`OutputGate::release_all`] by the
    /// operator). Held network frames are dropped (as a lossy link would;
    /// TCP sends again), which also lets go of the TAP for the standby.
    pub fn fence(&self) {
        let mut g = self.lock();
        g.fenced = true;
        g.holding = true;
        let chunks = std::mem::take(&mut g.held);
        let mut kept = VecDeque::new();
        let mut bytes = 0;
        for c in chunks {
            if !matches!(c.sink, Sink::Frame(_)) {
                bytes += c.data.len() as u64;
                kept.push_back(c);
            }
        }
        // Chunk counts change: the marks are void (nothing is released
        // while fenced anyway).
        g.marks.clear();
        g.held = kept;
        g.held_bytes = bytes;
        self.room.notify_all();
    }

    pub fn held_bytes(&self) -> u64 {
        self.lock().held_bytes
    }
}

impl Gate {
    fn push(&mut self, sink: Sink, data: &[u8]) {
        self.held_bytes += data.len() as u64;
        // Console bytes join the last console chunk unless an epoch mark
        // ends there.
        let end = self.base + self.held.len() as u64;
        let sealed = self.marks.back().is_some_and(|&(_, o)| o == end);
        if let (Sink::Console, Some(last), false) = (&sink, self.held.back_mut(), sealed) {
            if matches!(last.sink, Sink::Console) {
                last.data.extend_from_slice(data);
                return;
            }
        }
        self.held.push_back(Chunk {
            sink,
            data: data.to_vec(),
        });
    }

    fn emit(&mut self, n: usize) {
        let chunks: Vec<Chunk> = self.held.drain(..n).collect();
        self.base += n as u64;
        let mut console = false;
        for c in chunks {
            self.held_bytes -= c.data.len() as u64;
            match c.sink {
                Sink::Console => {
                    if let Some(out) = &mut self.out {
                        let _ = out.write_all(&c.data);
                        console = true;
                    }
                }
                // A frame the TAP refuses now is lost, as on a wire.
                Sink::Frame(tap) => {
                    let _ = tap.write_frame(&c.data);
                }
                Sink::Stream(sink) => sink.emit(&c.data),
            }
        }
        if console {
            if let Some(out) = &mut self.out {
                let _ = out.flush();
            }
        }
    }
}

struct GateWriter(Arc<OutputGate>);

impl Write for GateWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock_with_room(buf.len());
        if g.holding {
            g.push(Sink::Console, buf);
            return Ok(buf.len());
        }
        match &mut g.out {
            Some(out) => out.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut g = self.0.lock();
        let holding = g.holding;
        match &mut g.out {
            Some(out) if !holding => out.flush(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_epoch(mem_size: u64) -> Vec<u8> {
        let mut p = Vec::new();
        let mut b = PageBatchBuilder::default();
        b.push(0x1000, &[7; 4096]);
        b.push(0x2000, &[0; 4096]);
        b.flush(&mut p).unwrap();
        let mut state = crate::persist::tests::sample_state();
        state.config.mem_size = mem_size;
        stream::write_message(&mut p, &Message::State(Box::new(state))).unwrap();
        p
    }

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut out = Vec::new();
        write_frame(&mut out, FrameKind::Heartbeat, 0, &[]).unwrap();
        write_frame(&mut out, FrameKind::Epoch, 7, &[1, 2, 3]).unwrap();
        write_frame(&mut out, FrameKind::Ack, 7, &[]).unwrap();
        let mut r = &out[..];
        assert_eq!(read_frame(&mut r, 100).unwrap().kind, FrameKind::Heartbeat);
        let e = read_frame(&mut r, 100).unwrap();
        assert_eq!((e.kind, e.epoch, e.payload), (FrameKind::Epoch, 7, vec![1, 2, 3]));
        assert_eq!(read_frame(&mut r, 100).unwrap().epoch, 7);
        assert!(matches!(
            read_frame(&mut r, 100),
            Err(FailoverError::Stream(StreamError::Closed))
        ));
        // A flipped bit anywhere in the epoch frame: never accepted.
        let start = FRAME_HEADER_LEN + 8;
        for i in start..start + FRAME_HEADER_LEN + 3 + 8 {
            let mut v = out.clone();
            v[i] ^= 0x04;
            let mut r = &v[start..];
            assert!(read_frame(&mut r, 100).is_err(), "flip at {i} accepted");
        }
        // Too long for its kind, before any allocation.
        let mut v = Vec::new();
        write_frame(&mut v, FrameKind::Epoch, 1, &[0; 200]).unwrap();
        assert!(matches!(
            read_frame(&mut &v[..], 100),
            Err(FailoverError::TooLong { .. })
        ));
        // Cut short: truncated, not taken whole.
        let mut v = Vec::new();
        write_frame(&mut v, FrameKind::Epoch, 1, &[5; 50]).unwrap();
        for cut in [1, 30, v.len() - 1] {
            let e = read_frame(&mut &v[..cut], 100).unwrap_err().to_string();
            assert!(e.contains("truncated"), "{cut}: {e}");
        }
    }

    #[test]
    fn epochs_are_checked_before_anything_is_written() {
        let size = 32 << 20;
        let mem = crate::memory::create(size).unwrap();
        let p = sample_epoch(size);
        let e = check_epoch(&p, &mem, size, 1).unwrap();
        assert_eq!(e.pages(), 2);
        apply_epoch(&mem, e).unwrap();
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
        assert!(page.iter().all(|&b| b == 7));
        // A page outside memory in a later batch: refused, and the first
        // batch's pages are not written either.
        let mut p = Vec::new();
        let mut b = PageBatchBuilder::default();
        b.push(0x3000, &[9; 4096]);
        b.flush(&mut p).unwrap();
        b.push(1 << 40, &[9; 4096]);
        b.flush(&mut p).unwrap();
        let mut state = crate::persist::tests::sample_state();
        state.config.mem_size = size;
        stream::write_message(&mut p, &Message::State(Box::new(state))).unwrap();
        assert!(check_epoch(&p, &mem, size, 1).is_err());
        mem.read_slice(&mut page, GuestAddress(0x3000)).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        // No state, or another machine's: refused.
        let no_state = &sample_epoch(size)[..8 + 4 + 8 + 4096 + 8 + 8 + 8];
        assert!(check_epoch(no_state, &mem, size, 1).is_err());
        assert!(check_epoch(&sample_epoch(64 << 20), &mem, size, 1).is_err());
    }

    #[test]
    fn gate_releases_by_epoch_and_fences() {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let gate = Arc::new(OutputGate::default());
        let mut w = gate.writer(Box::new(sink.clone()));
        w.write_all(b"a").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"a");
        gate.hold();
        w.write_all(b"b").unwrap();
        gate.mark(1);
        w.write_all(b"c").unwrap();
        gate.mark(2);
        w.write_all(b"d").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"a");
        gate.release(1);
        assert_eq!(&*sink.0.lock().unwrap(), b"ab");
        gate.release(2);
        assert_eq!(&*sink.0.lock().unwrap(), b"abc");
        gate.mark(3);
        gate.fence();
        gate.release(3);
        assert_eq!(&*sink.0.lock().unwrap(), b"abc");
        assert_eq!(gate.held_bytes(), 1);
        gate.release_all();
        w.write_all(b"e").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"abcde");
    }

    #[test]
    fn held_output_is_bounded_the_writer_waits_for_an_ack_or_a_pause() {
        struct Null;
        impl OutputSink for Null {
            fn emit(&self, _: &[u8]) {}
        }
        let sink: Arc<dyn OutputSink> = Arc::new(Null);
        let gate = Arc::new(OutputGate::with_limit(10));
        gate.hold();
        gate.send_to(&sink, &[1; 8]);
        gate.mark(1);
        // 8 + 5 > 10: the writer waits.
        let writer = |gate: &Arc<OutputGate>| {
            let (gate, sink) = (gate.clone(), sink.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                gate.send_to(&sink, &[2; 5]);
                let _ = tx.send(());
            });
            rx
        };
        let done = writer(&gate);
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "went over the bound"
        );
        assert_eq!(gate.held_bytes(), 8);
        // Epoch 1 acknowledged: room again.
        gate.release(1);
        done.recv_timeout(Duration::from_secs(10))
            .expect("still waiting after the ack");
        assert_eq!(gate.held_bytes(), 5);
        gate.send_to(&sink, &[3; 5]);
        // Full again; a checkpoint's pause lets the waiting writer through.
        let done = writer(&gate);
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "went over the bound"
        );
        gate.set_pausing(true);
        done.recv_timeout(Duration::from_secs(10))
            .expect("still waiting in a pause");
        gate.set_pausing(false);
        assert_eq!(gate.held_bytes(), 15);
        // Protection ends: everything goes, and writers pass through.
        let done = writer(&gate);
        gate.release_all();
        done.recv_timeout(Duration::from_secs(10))
            .expect("still waiting, unprotected");
        assert_eq!(gate.held_bytes(), 0);
    }

    #[test]
    fn mutated_standby_streams_never_panic() {
        let size = 32 << 20;
        let mut good = Vec::new();
        write_frame(&mut good, FrameKind::Heartbeat, 0, &[]).unwrap();
        write_frame(&mut good, FrameKind::DiskWrites, 1, &sample_disk_writes()).unwrap();
        write_frame(&mut good, FrameKind::Epoch, 1, &sample_epoch(size)).unwrap();
        fuzz_standby(&good);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..200 {
            let mut b = good.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 40) as u8;
            }
            fuzz_standby(&b);
            fuzz_standby(&b[..(x >> 20) as usize % b.len()]);
        }
    }

    fn sample_disk_writes() -> Vec<u8> {
        encode_disk_writes(
            3,
            &[
                (
                    0,
                    vec![DiskOp::Write {
                        offset: 512,
                        data: vec![7; 1024],
                    }],
                ),
                (
                    1,
                    vec![DiskOp::Zero {
                        offset: 4096,
                        len: 8192,
                    }],
                ),
            ],
        )
    }

    #[test]
    fn disk_writes_round_trip_and_bad_ones_are_refused() {
        let p = sample_disk_writes();
        let w = parse_disk_writes(&p, 2).unwrap();
        assert_eq!(w.committed_through, 3);
        assert_eq!(
            w.ops,
            vec![
                (
                    0,
                    DiskOp::Write {
                        offset: 512,
                        data: vec![7; 1024]
                    }
                ),
                (
                    1,
                    DiskOp::Zero {
                        offset: 4096,
                        len: 8192
                    }
                ),
            ]
        );
        // A disk the machine does not have.
        assert!(parse_disk_writes(&p, 1).is_err());
        // Every truncation is refused (a whole op may end the payload).
        for cut in 1..p.len() {
            if cut == 8 || cut == 8 + 24 + 1024 {
                continue;
            }
            assert!(parse_disk_writes(&p[..cut], 2).is_err(), "cut at {cut} accepted");
        }
        // An unknown kind, reserved bytes, an overflowing range, data
        // that is not there.
        for (at, v) in [(8 + 4, 9u8), (8 + 5, 1), (8 + 16 + 7, 0xff), (8 + 23, 0x10)] {
            let mut b = p.clone();
            b[at] = v;
            assert!(parse_disk_writes(&b, 2).is_err(), "byte {at} = {v} accepted");
        }
    }

    #[test]
    fn pause_stats() {
        let mut s = PauseStats::default();
        assert_eq!(s.summary(), (0.0, 0.0));
        for ms in 1..=100 {
            s.add(Duration::from_millis(ms));
        }
        let (m, p99) = s.summary();
        assert!((50.0..=51.0).contains(&m) && (98.0..=100.0).contains(&p99), "{m} {p99}");
    }
}
