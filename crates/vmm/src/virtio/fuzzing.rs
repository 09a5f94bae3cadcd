//! Entry points for fuzzing the virtio devices with hostile guests: the
//! `cargo fuzz` targets in `crates/vmm/fuzz` and a deterministic unit test
//! call these.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::blk::{BlockMetrics, RequestContext};
use super::mmio::MmioTransport;
use super::queue::serve;
use super::{Interrupt, VirtioDevice};
use crate::devices::irq_line::InterruptLine;

/// Guest memory the fuzzer fills: 64 KiB at 0, a hole, 64 KiB at 1 MiB.
const LOW: u64 = 0x1_0000;
const HIGH: u64 = 0x10_0000;

#[derive(Default)]
struct CountingLine(AtomicU64);

impl InterruptLine for CountingLine {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), LOW as usize), (GuestAddress(HIGH), LOW as usize)])
        .expect("fuzz memory");
    let n = data.len().min(LOW as usize);
    let _ = mem.write_slice(&data[..n], GuestAddress(0));
    if data.len() > n {
        let m = (data.len() - n).min(LOW as usize);
        let _ = mem.write_slice(&data[n..n + m], GuestAddress(HIGH));
    }
    mem
}

/// A small raw disk in a temporary file, shared by all runs.
fn disk() -> Arc<dyn disk::BlockBackend> {
    static DISK: OnceLock<Arc<dyn disk::BlockBackend>> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("vessel-fuzz-disk-{}", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .expect("fuzz disk");
        let d = disk::open(
            &path,
            &disk::OpenOptions {
                read_only: false,
                ..Default::default()
            },
        )
        .expect("fuzz disk");
        let _ = std::fs::remove_file(&path);
        Arc::from(d)
    })
    .clone()
}

/// The block device's queue handling on arbitrary guest memory: the first
/// bytes choose the queue's size, ring addresses and features; all of
/// memory (descriptors, rings, request headers) is the input.
pub fn blk_queue(data: &[u8]) {
    if data.len() < 16 {
        return;
    }
    let mem = memory(&data[16..]);
    let size = 1u16 << (data[0] % 9);
    let addr = |i: usize| u64::from(u16::from_le_bytes([data[i], data[i + 1]])) & !0xf;
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(addr(1) as u32), None);
    queue.set_avail_ring_address(Some(addr(3) as u32), None);
    queue.set_used_ring_address(Some(addr(5) as u32), None);
    queue.set_event_idx(data[7] & 1 != 0);
    queue.set_next_avail(u16::from_le_bytes([data[8], data[9]]));
    queue.set_ready(true);
    if !queue.is_valid(&mem) {
        return;
    }
    let line = Arc::new(CountingLine::default());
    let interrupt = Interrupt::new(line);
    let metrics = BlockMetrics::default();
    let dma = super::no_dma_observer();
    let ctx = RequestContext {
        disk: &*disk(),
        metrics: &metrics,
        dma: &dma,
    };
    // The driver may move the available index while we serve: do a few
    // rounds with the index bumped, as a racing guest would.
    for round in 0..3u16 {
        let _ = serve(&mut queue, &mem, &interrupt, |chain| ctx.handle(&mem, chain));
        let avail_idx = GuestAddress(addr(3) + 2);
        let _ = mem.write_obj(u16::from_le_bytes([data[10], data[11]]).wrapping_add(round), avail_idx);
    }
}

/// The virtio-mmio transport driven by arbitrary register accesses.
pub fn mmio_registers(data: &[u8]) {
    let mem = memory(&[]);
    let line = Arc::new(CountingLine::default());
    let device: Box<dyn VirtioDevice> = Box::new(super::blk::Block::new(disk()));
    let Ok(mut t) = MmioTransport::new(device, mem, Arc::new(Interrupt::new(line)), super::no_dma_observer()) else {
        return;
    };
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x200;
        let value = [op[3], op[4], op[5], op[6]];
        let len = [1usize, 2, 4, 8][(op[0] >> 1) as usize % 4].min(4);
        if op[0] & 1 == 0 {
            let mut buf = [0u8; 4];
            t.read(offset, &mut buf[..len]);
        } else {
            t.write(offset, &value[..len]);
        }
    }
    t.reset();
}

/// The vsock back end fed arbitrary packets from the guest, with its
/// replies drained into buffers of arbitrary sizes: a header, then as many
/// payload bytes as the input holds (at most what the header claims).
/// Guest connections to port 80 reach a real host listener.
pub fn vsock_packets(data: &[u8]) {
    use super::vsock::backend::Backend;
    use super::vsock::packet::{Hdr, HDR_LEN};
    static HOST: OnceLock<(std::path::PathBuf, std::os::unix::net::UnixListener)> = OnceLock::new();
    let (dir, _listener) = HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vessel-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let l = std::os::unix::net::UnixListener::bind(dir.join("v.sock_80")).expect("fuzz vsock listener");
        (dir, l)
    });
    let Ok(mut b) = Backend::new(3, &dir.join("v.sock")) else {
        return;
    };
    let mut rest = data;
    let mut out = vec![0u8; 8192];
    while rest.len() > HDR_LEN {
        let hdr = Hdr::parse(rest[..HDR_LEN].try_into().expect("header"));
        rest = &rest[HDR_LEN..];
        let n = (hdr.len as usize).min(rest.len());
        let (payload, tail) = rest.split_at(n);
        rest = tail;
        b.handle_guest_packet(None, &hdr, payload);
        let room = (usize::from(hdr.flags as u8) * 40).min(out.len());
        for _ in 0..4 {
            if b.next_rx(None, &mut out[..room]).is_none() {
                break;
            }
        }
    }
    b.expire(
        None,
        std::time::Instant::now() + super::vsock::backend::CONNECT_TIMEOUT * 2,
    );
    while b.next_rx(None, &mut out).is_some() {}
    assert!(b.connections() <= super::vsock::backend::MAX_CONNECTIONS);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic stand-in for the fuzzers: pseudo-random inputs,
    /// plus crafted hostile rings.
    #[test]
    fn hostile_inputs_do_not_panic_or_hang() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let len = (next() % 9000) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            blk_queue(&data);
            mmio_registers(&data);
            vsock_packets(&data);
        }
    }

    /// Inputs the fuzzer found: each once hung or crashed the device.
    #[test]
    fn fuzz_regressions() {
        // Used and available rings overlap: every used entry looked like a
        // new request, and the queue was served forever.
        blk_queue(include_bytes!("fuzz_regressions/blk_overlapping_rings.bin"));
    }
}
