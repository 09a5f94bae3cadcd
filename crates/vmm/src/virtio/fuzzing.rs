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
        overlay: None,
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
/// The first two bytes say how many 7-byte register operations follow;
/// what is left fills guest memory, so that the requests the driver
/// starts meet rings and descriptors with content.
pub fn mmio_registers(data: &[u8]) {
    let (count, data) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let (data, contents) = data.split_at((count * 7).min(data.len()));
    let mem = memory(contents);
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

/// A device's queues driven through its virtio-mmio transport, with its
/// real worker thread: the first bytes choose each queue's size and ring
/// addresses, the rest fills guest memory (descriptors, rings, buffers).
/// The driver notifies, moves the available index under the worker's feet,
/// notifies again, and finally resets the device.
fn device_queues(device: Box<dyn VirtioDevice>, data: &[u8]) {
    use virtio_bindings::virtio_config::*;
    use virtio_bindings::virtio_mmio::*;

    let header = 24;
    if data.len() < header {
        return;
    }
    let (setup, contents) = data.split_at(header);
    let mem = memory(contents);
    let line = Arc::new(CountingLine::default());
    let Ok(mut t) = MmioTransport::new(
        device,
        mem.clone(),
        Arc::new(Interrupt::new(line.clone())),
        super::no_dma_observer(),
    ) else {
        return;
    };
    let write = |t: &mut MmioTransport, reg: u32, v: u32| t.write(u64::from(reg), &v.to_le_bytes());
    let addr = |i: usize| {
        let a = u64::from(u16::from_le_bytes([setup[i], setup[i + 1]])) & !0xf;
        // Either ring area of the fuzzer's memory.
        if setup[i] & 1 == 0 {
            a % LOW
        } else {
            HIGH + a % LOW
        }
    };
    let ok = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    write(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write(
        &mut t,
        VIRTIO_MMIO_DRIVER_FEATURES,
        1 << (super::VIRTIO_F_VERSION_1 - 32),
    );
    write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write(
        &mut t,
        VIRTIO_MMIO_DRIVER_FEATURES,
        u32::from(setup[0] & 1) << super::VIRTIO_RING_F_EVENT_IDX,
    );
    write(&mut t, VIRTIO_MMIO_STATUS, ok);
    let queues = t.notifiers().len().min(3);
    let mut avail = Vec::new();
    for q in 0..queues {
        let at = 1 + 7 * q;
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, q as u32);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 1 << (setup[at] % 9));
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, addr(at + 1) as u32);
        write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, addr(at + 3) as u32);
        write(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, addr(at + 5) as u32);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        avail.push(addr(at + 3));
    }
    write(&mut t, VIRTIO_MMIO_STATUS, ok | VIRTIO_CONFIG_S_DRIVER_OK);
    for round in 0..3u16 {
        for (q, &ring) in avail.iter().enumerate() {
            write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, q as u32);
            if round > 0 {
                let _ = mem.write_obj(
                    u16::from_le_bytes([setup[22], setup[23]]).wrapping_add(round),
                    GuestAddress(ring + 2),
                );
            }
        }
        // Let the worker run; whatever it has not finished, the reset stops.
        std::thread::sleep(std::time::Duration::from_micros(300));
    }
    t.reset();
}

/// virtio-rng's request queue.
pub fn rng_queue(data: &[u8]) {
    device_queues(Box::new(super::rng::Rng::default()), data);
}

/// virtio-console's receive and transmit queues (output to /dev/null,
/// through the same size cap as a real console file).
pub fn console_queues(data: &[u8]) {
    let Ok(out) = std::fs::OpenOptions::new().append(true).open("/dev/null") else {
        panic!("/dev/null cannot be opened for writing");
    };
    device_queues(Box::new(super::console::Console::new(out)), data);
}

/// virtio-net's receive and transmit queues on a real TAP, shared by all
/// runs (creating one needs CAP_NET_ADMIN: the target fails without it).
/// Frames the guest sends go out through the TAP; the host side sends the
/// fuzzer's own frames in, so that the receive path writes guest memory.
pub fn net_queues(data: &[u8]) {
    static TAP: OnceLock<super::tap::Tap> = OnceLock::new();
    let tap = TAP.get_or_init(|| {
        let tap =
            super::tap::Tap::open(Some("vfuzz%d")).unwrap_or_else(|e| panic!("the net fuzz target needs a TAP: {e}"));
        let status = std::process::Command::new("ip")
            .args(["link", "set", "dev", tap.name(), "up"])
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "cannot bring {} up with `ip link`: {status:?}",
            tap.name()
        );
        tap
    });
    let Ok(handle) = tap.try_clone() else {
        panic!("cannot duplicate the TAP's descriptor");
    };
    if let Some(frame) = data.get(24..).map(|d| &d[..d.len().min(1514)]) {
        inject_frame(tap.name(), frame);
    }
    device_queues(
        Box::new(super::net::Net::new(handle, [0x52, 0x54, 0, 0x12, 0x34, 0x56])),
        data,
    );
}

/// Transmit `frame` on the host's side of interface `ifname`, so that the
/// TAP's reader receives it (best effort: a frame the kernel refuses, for
/// its size or its headers, is simply not delivered).
fn inject_frame(ifname: &str, frame: &[u8]) {
    if frame.len() < 14 {
        return;
    }
    let Ok(name) = std::ffi::CString::new(ifname) else {
        return;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated name and nothing else.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return;
    }
    // SAFETY: a plain socket(2) call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `to` are valid for the lengths passed, for the
    // duration of the call; `fd` is our own socket.
    unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
    }
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
        for _ in 0..40 {
            let len = (next() % 9000) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            rng_queue(&data);
            console_queues(&data);
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
