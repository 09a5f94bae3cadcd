//! Device and transport tests with a hand-built driver: descriptor tables,
//! rings and requests written into real guest memory, the way a (possibly
//! hostile) guest driver would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::blk::Block;
use super::mmio::MmioTransport;
use super::{Interrupt, VIRTIO_F_VERSION_1};
use crate::devices::irq_line::InterruptLine;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;

#[derive(Default)]
struct Line(AtomicU64);
impl InterruptLine for Line {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    line: Arc<Line>,
    image: std::path::PathBuf,
    dma_log: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.image);
    }
}

fn rig(name: &str, read_only: bool) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let image = std::env::temp_dir().join(format!("vessel-virtio-{name}-{}", std::process::id()));
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, data).unwrap();
    let disk = disk::open(
        &image,
        &disk::OpenOptions {
            read_only,
            ..Default::default()
        },
    )
    .unwrap();
    let line = Arc::new(Line::default());
    let dma_log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = dma_log.clone();
    let t = MmioTransport::new(
        Box::new(Block::new(Arc::from(disk))),
        mem.clone(),
        Arc::new(Interrupt::new(line.clone())),
        Arc::new(move |gpa, len| log.lock().unwrap().push((gpa, len))),
    )
    .unwrap();
    Rig {
        mem,
        t,
        line,
        image,
        dma_log,
    }
}

impl Rig {
    fn w(&mut self, reg: u32, v: u32) {
        self.t.write(reg as u64, &v.to_le_bytes());
    }
    fn r(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(reg as u64, &mut b);
        u32::from_le_bytes(b)
    }
    /// The Linux driver's start-up sequence.
    fn start(&mut self) {
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32));
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.w(VIRTIO_MMIO_STATUS, s);
        assert_eq!(self.r(VIRTIO_MMIO_STATUS), s);
        self.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        self.w(VIRTIO_MMIO_QUEUE_NUM, QSIZE as u32);
        self.w(VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
        self.w(VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
        self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        self.w(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = DESC + 16 * i as u64;
        self.mem.write_obj(addr, GuestAddress(a)).unwrap();
        self.mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }
    /// Offer chain heads and notify; wait until the used index reaches
    /// `want_used` (or time out, which fails the test).
    fn submit(&mut self, heads: &[u16], avail_idx: u16, want_used: u16) {
        for (k, h) in heads.iter().enumerate() {
            let slot = (avail_idx as usize - heads.len() + k) % QSIZE as usize;
            self.mem
                .write_obj(*h, GuestAddress(AVAIL + 4 + 2 * slot as u64))
                .unwrap();
        }
        self.mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        self.wait_used(want_used);
    }
    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }
    fn wait_used(&self, want: u16) {
        let t0 = Instant::now();
        while self.used_idx() != want {
            assert!(t0.elapsed() < Duration::from_secs(5), "device did not complete");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    fn request(&self, head: u16, kind: u32, sector: u64, data_len: u32, data_writable: bool) {
        let hdr = 0x10000u64;
        self.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        let next = 1;
        self.desc(head, hdr, 16, 1, head + next);
        let wflag = if data_writable { 2 } else { 0 };
        self.desc(head + 1, 0x20000, data_len, 1 | wflag, head + 2);
        self.desc(head + 2, 0x30000, 1, 2, 0);
        self.mem.write_obj(0xffu8, GuestAddress(0x30000)).unwrap();
    }
    fn status_byte(&self) -> u8 {
        self.mem.read_obj(GuestAddress(0x30000)).unwrap()
    }
}

#[test]
fn reads_a_sector_and_reports_ok() {
    let mut r = rig("read", false);
    r.start();
    r.request(0, VIRTIO_BLK_T_IN, 2, 512, true);
    r.submit(&[0], 1, 1);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
    let mut buf = [0u8; 512];
    r.mem.read_slice(&mut buf, GuestAddress(0x20000)).unwrap();
    let want: Vec<u8> = (1024..1536u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(&buf[..], &want[..]);
    // The used length counts the data and the status byte.
    let used_len: u32 = r.mem.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
    assert_eq!(used_len, 513);
    assert!(r.line.0.load(Ordering::SeqCst) >= 1);
    assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS) & 1, 1);
    // The engine heard of both writable buffers (data and status), so it
    // can drop code it decoded from those pages.
    let log = r.dma_log.lock().unwrap().clone();
    assert!(log.contains(&(0x20000, 512)) && log.contains(&(0x30000, 1)), "{log:?}");
}

#[test]
fn writes_reach_the_file_and_flush_succeeds() {
    let mut r = rig("write", false);
    r.start();
    r.mem.write_slice(&[0xab; 1024], GuestAddress(0x20000)).unwrap();
    r.request(0, VIRTIO_BLK_T_OUT, 4, 1024, false);
    r.submit(&[0], 1, 1);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
    r.request(3, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    // A flush has no data descriptor: header straight to status.
    r.desc(3, 0x10000, 16, 1, 5);
    r.submit(&[3], 2, 2);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
    let file = std::fs::read(&r.image).unwrap();
    assert!(file[2048..3072].iter().all(|&b| b == 0xab));
    assert_eq!(file[3072], (3072 % 251) as u8);
}

#[test]
fn out_of_range_unaligned_and_read_only_requests_fail() {
    let mut r = rig("range", false);
    r.start();
    // Past the end (64 KiB = 128 sectors).
    r.request(0, VIRTIO_BLK_T_IN, 127, 1024, true);
    r.submit(&[0], 1, 1);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_IOERR as u8);
    // A sector number that overflows when turned into bytes.
    r.request(0, VIRTIO_BLK_T_IN, u64::MAX / 2, 512, true);
    r.submit(&[0], 2, 2);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_IOERR as u8);
    // Not a whole sector.
    r.request(0, VIRTIO_BLK_T_IN, 0, 100, true);
    r.submit(&[0], 3, 3);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_IOERR as u8);
    // Unknown request type.
    r.request(0, 77, 0, 512, true);
    r.submit(&[0], 4, 4);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_UNSUPP as u8);

    let mut ro = rig("ro", true);
    ro.start();
    ro.request(0, VIRTIO_BLK_T_OUT, 0, 512, false);
    ro.submit(&[0], 1, 1);
    assert_eq!(ro.status_byte(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(std::fs::read(&ro.image).unwrap()[0], 0);
}

#[test]
fn looping_and_wild_descriptor_chains_do_not_hang_or_escape() {
    let mut r = rig("loop", false);
    r.start();
    // Two descriptors pointing at each other.
    r.desc(0, 0x10000, 16, 1, 1);
    r.desc(1, 0x20000, 512, 1 | 2, 0);
    r.submit(&[0], 1, 1);
    // A descriptor pointing outside guest memory (1 MiB), writable.
    r.desc(4, 0x10000, 16, 1, 5);
    r.desc(5, 0xfff_0000, 4096, 1 | 2, 6);
    r.desc(6, 0x30000, 1, 2, 0);
    r.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x10000)).unwrap();
    r.submit(&[4], 2, 2);
    // A next index beyond the queue.
    r.desc(7, 0x10000, 16, 1, 900);
    r.submit(&[7], 3, 3);
    // The device survived all of it and still serves a good request.
    r.request(8, VIRTIO_BLK_T_IN, 0, 512, true);
    r.submit(&[8], 4, 4);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // A head beyond the queue cannot even be returned: NEEDS_RESET.
    r.mem.write_obj(200u16, GuestAddress(AVAIL + 4 + 2 * 4)).unwrap();
    r.mem.write_obj(5u16, GuestAddress(AVAIL + 2)).unwrap();
    r.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let t0 = Instant::now();
    while r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_runaway_available_index_marks_the_device_for_reset() {
    let mut r = rig("runaway", false);
    r.start();
    r.mem.write_obj(QSIZE + 5, GuestAddress(AVAIL + 2)).unwrap();
    r.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let t0 = Instant::now();
    while r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 2, "config interrupt");
    // A reset and a fresh start bring the device back.
    r.w(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r.r(VIRTIO_MMIO_STATUS), 0);
    r.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    r.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    r.start();
    r.request(0, VIRTIO_BLK_T_IN, 0, 512, true);
    r.submit(&[0], 1, 1);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn protocol_violations_are_refused() {
    let mut r = rig("proto", false);
    assert_eq!(r.r(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r.r(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r.r(VIRTIO_MMIO_DEVICE_ID), 2);
    // Features the device never offered: FEATURES_OK does not stick.
    r.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    r.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    r.w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << 27);
    r.w(VIRTIO_MMIO_STATUS, 0xb);
    assert_eq!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // Without VERSION_1 (a legacy driver): refused too.
    r.w(VIRTIO_MMIO_STATUS, 0);
    r.w(VIRTIO_MMIO_STATUS, 3);
    r.w(VIRTIO_MMIO_DRIVER_FEATURES, 0);
    r.w(VIRTIO_MMIO_STATUS, 0xb);
    assert_eq!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // DRIVER_OK before FEATURES_OK.
    r.w(VIRTIO_MMIO_STATUS, 0);
    r.w(VIRTIO_MMIO_STATUS, 3 | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_ne!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // Queue registers written after DRIVER_OK.
    r.w(VIRTIO_MMIO_STATUS, 0);
    r.start();
    r.w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
    assert_ne!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // A queue whose rings lie outside memory: NEEDS_RESET at DRIVER_OK.
    r.w(VIRTIO_MMIO_STATUS, 0);
    r.w(VIRTIO_MMIO_STATUS, 3);
    r.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    r.w(VIRTIO_MMIO_DRIVER_FEATURES, 1);
    r.w(VIRTIO_MMIO_STATUS, 0xb);
    r.w(VIRTIO_MMIO_QUEUE_NUM, QSIZE as u32);
    r.w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0xfff0_0000);
    r.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
    r.w(VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
    r.w(VIRTIO_MMIO_QUEUE_READY, 1);
    r.w(VIRTIO_MMIO_STATUS, 0xf);
    assert_ne!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // Odd-sized and out-of-window accesses read zero and change nothing.
    let mut b = [0xffu8; 2];
    r.t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    let mut cfg = [0u8; 8];
    r.t.read(0x100, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 128, "capacity in sectors");
}

/// Pause stops the worker with every request it took completed, keeps the
/// ring positions in the transport's state, leaves guest memory alone while
/// paused (doorbells wait in their eventfds), and resume serves what the
/// driver queued meanwhile: nothing lost, nothing done twice.
#[test]
fn pause_completes_requests_in_flight_and_resume_continues() {
    let mut r = rig("pause", false);
    r.start();
    // Eight reads of one sector each (two descriptors per request: the
    // header, then data and status in one device-writable buffer whose
    // last byte is the status), all made available at once.
    let pairs = QSIZE / 2;
    for i in 0..pairs {
        let hdr = 0x10000 + 0x100 * i as u64;
        r.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(hdr)).unwrap();
        r.mem.write_obj(i as u64, GuestAddress(hdr + 8)).unwrap();
        r.desc(2 * i, hdr, 16, 1, 2 * i + 1);
        r.desc(2 * i + 1, 0x20000 + 0x400 * i as u64, 513, 2, 0);
        r.mem
            .write_slice(&[0xee; 513], GuestAddress(0x20000 + 0x400 * i as u64))
            .unwrap();
        r.mem.write_obj(2 * i, GuestAddress(AVAIL + 4 + 2 * i as u64)).unwrap();
    }
    r.mem.write_obj(pairs, GuestAddress(AVAIL + 2)).unwrap();
    r.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    // Pause at once: whatever the worker took, it completed.
    r.t.pause();
    assert!(r.t.is_paused());
    let q = &r.t.state().queues[0];
    assert_eq!(q.next_avail, q.next_used, "a request was taken but not completed");
    assert_eq!(r.used_idx(), q.next_used);
    let done_before = q.next_used;
    // Paused: more doorbells change nothing in guest memory.
    r.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let before: Vec<u8> = {
        let mut b = vec![0u8; 0x40000];
        r.mem.read_slice(&mut b, GuestAddress(0)).unwrap();
        b
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut after = vec![0u8; 0x40000];
    r.mem.read_slice(&mut after, GuestAddress(0)).unwrap();
    assert!(before == after, "guest memory changed while paused");
    assert_eq!(r.t.state().queues[0].next_used, done_before);
    // Resume: every request completes exactly once.
    r.t.resume();
    assert!(!r.t.is_paused());
    r.wait_used(pairs);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.used_idx(), pairs, "a request was served twice");
    for i in 0..pairs {
        let data = 0x20000 + 0x400 * i as u64;
        let mut buf = [0u8; 513];
        r.mem.read_slice(&mut buf, GuestAddress(data)).unwrap();
        let want: Vec<u8> = (512 * i as u32..512 * (i as u32 + 1))
            .map(|b| (b % 251) as u8)
            .collect();
        assert_eq!(&buf[..512], &want[..], "request {i}");
        assert_eq!(buf[512], VIRTIO_BLK_S_OK as u8, "request {i}");
    }
    // Pause twice, resume twice: harmless.
    r.t.pause();
    r.t.pause();
    r.t.resume();
    r.t.resume();
    r.request(0, VIRTIO_BLK_T_IN, 0, 512, true);
    r.submit(&[0], pairs + 1, pairs + 1);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
}

/// A driver that starts the device while the machine is paused gets its
/// worker only on resume.
#[test]
fn a_device_started_while_paused_runs_on_resume() {
    let mut r = rig("pausedstart", false);
    r.t.pause();
    r.start();
    r.request(0, VIRTIO_BLK_T_IN, 0, 512, true);
    r.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    r.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    r.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.used_idx(), 0);
    r.t.resume();
    r.wait_used(1);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
}

/// A device reset hands its worker over instead of joining it under the
/// transport's lock; the registers are reset at once. Until that worker
/// has ended, the driver cannot start a second one on the rings.
#[test]
fn reset_hands_the_worker_over_and_guards_the_next_start() {
    let mut r = rig("retire", false);
    r.start();
    r.request(0, VIRTIO_BLK_T_IN, 0, 512, true);
    r.submit(&[0], 1, 1);
    r.w(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r.r(VIRTIO_MMIO_STATUS), 0);
    let retiring = r.t.take_retiring().expect("the reset stopped a worker");
    assert!(r.t.take_retiring().is_none());
    // Still held (as by a vCPU that has not finished waiting): refused.
    r.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    r.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    r.start();
    assert_ne!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    retiring.wait();
    r.w(VIRTIO_MMIO_STATUS, 0);
    assert!(r.t.take_retiring().is_none(), "the refused start ran no worker");
    r.start();
    assert_eq!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    r.request(0, VIRTIO_BLK_T_IN, 0, 512, true);
    r.submit(&[0], 1, 1);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
    // Nobody takes the next reset's worker: the transport waits for it
    // itself at the next start.
    r.w(VIRTIO_MMIO_STATUS, 0);
    r.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    r.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    r.start();
    r.request(0, VIRTIO_BLK_T_IN, 0, 512, true);
    r.submit(&[0], 1, 1);
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
}

/// Shutdown stops the worker and flushes the disk; the device is then
/// still (no worker thread left).
#[test]
fn shutdown_stops_the_worker_and_flushes() {
    let mut r = rig("shutdown", false);
    r.start();
    r.mem.write_slice(&[0x5a; 512], GuestAddress(0x20000)).unwrap();
    r.request(0, VIRTIO_BLK_T_OUT, 1, 512, false);
    r.submit(&[0], 1, 1);
    r.t.shutdown().unwrap();
    r.mem.write_obj(1u16, GuestAddress(AVAIL + 4 + 2)).unwrap();
    r.mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
    r.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.used_idx(), 1, "a stopped device served a request");
    assert!(std::fs::read(&r.image).unwrap()[512..1024].iter().all(|&b| b == 0x5a));
}
