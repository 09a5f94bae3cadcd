//! The vsock device driven by a hand-built driver in real guest memory,
//! against real host Unix sockets: both directions, teardown, and a
//! hostile guest (bogus packets, credit overruns, connection floods).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::{BUF_SIZE, HOST_CID, MAX_CONNECTIONS};
use super::packet::*;
use super::Vsock;
use crate::devices::irq_line::InterruptLine;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{Interrupt, VIRTIO_F_VERSION_1};

const QSIZE: u16 = 64;
const CID: u64 = 3;
const RX_BUF: u32 = 4096 + HDR_LEN as u32;

#[derive(Default)]
struct Line(AtomicU64);
impl InterruptLine for Line {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Where queue `q`'s rings and buffers live.
fn desc(q: usize) -> u64 {
    0x1000 + 0x3000 * q as u64
}
fn avail(q: usize) -> u64 {
    desc(q) + 0x1000
}
fn used(q: usize) -> u64 {
    desc(q) + 0x2000
}
fn buffer(q: usize, i: u16) -> u64 {
    0x10_0000 + 0x10_0000 * q as u64 + 0x4000 * u64::from(i)
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("vessel-vsock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// A guest driver for the device.
struct Driver {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    avail_idx: [u16; 3],
    used_seen: [u16; 3],
    uds: PathBuf,
}

impl Driver {
    fn new(dir: &Dir) -> Driver {
        let uds = dir.0.join("v.sock");
        Self::with_device(Vsock::new(CID, &uds).unwrap(), uds)
    }

    fn with_device(dev: Vsock, uds: PathBuf) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let line = Arc::new(Line::default());
        let t = MmioTransport::new(
            Box::new(dev),
            mem.clone(),
            Arc::new(Interrupt::new(line)),
            crate::virtio::no_dma_observer(),
        )
        .unwrap();
        Driver {
            mem,
            t,
            avail_idx: [0; 3],
            used_seen: [0; 3],
            uds,
        }
    }

    fn w(&mut self, reg: u32, v: u32) {
        self.t.write(reg as u64, &v.to_le_bytes());
    }
    fn r(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(reg as u64, &mut b);
        u32::from_le_bytes(b)
    }

    /// Linux's start-up sequence, then rx and event buffers.
    fn start(&mut self) {
        assert_eq!(self.r(VIRTIO_MMIO_DEVICE_ID), 19);
        let mut cid = [0u8; 8];
        self.t.read(VIRTIO_MMIO_CONFIG as u64, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), CID);
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32));
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.w(VIRTIO_MMIO_STATUS, s);
        for q in 0..3 {
            self.w(VIRTIO_MMIO_QUEUE_SEL, q as u32);
            self.w(VIRTIO_MMIO_QUEUE_NUM, QSIZE as u32);
            self.w(VIRTIO_MMIO_QUEUE_DESC_LOW, desc(q) as u32);
            self.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail(q) as u32);
            self.w(VIRTIO_MMIO_QUEUE_USED_LOW, used(q) as u32);
            self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.w(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        for _ in 0..QSIZE {
            self.post(0);
        }
        self.post(2);
        self.notify(0);
        self.notify(2);
    }

    fn notify(&mut self, q: u32) {
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, q);
    }

    /// Offer one device-writable buffer on queue `q` (rx or event).
    fn post(&mut self, q: usize) {
        let slot = self.avail_idx[q] % QSIZE;
        let a = desc(q) + 16 * u64::from(slot);
        let len = if q == 0 { RX_BUF } else { 4 };
        self.mem.write_obj(buffer(q, slot), GuestAddress(a)).unwrap();
        self.mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(2u16, GuestAddress(a + 12)).unwrap(); // WRITE
        self.mem
            .write_obj(slot, GuestAddress(avail(q) + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail(q) + 2))
            .unwrap();
    }

    /// Send raw bytes as one packet on the tx queue.
    fn send_raw(&mut self, bytes: &[u8]) {
        let q = 1;
        let slot = self.avail_idx[q] % QSIZE;
        let a = desc(q) + 16 * u64::from(slot);
        self.mem.write_slice(bytes, GuestAddress(buffer(q, slot))).unwrap();
        self.mem.write_obj(buffer(q, slot), GuestAddress(a)).unwrap();
        self.mem.write_obj(bytes.len() as u32, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(a + 12)).unwrap();
        self.mem
            .write_obj(slot, GuestAddress(avail(q) + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail(q) + 2))
            .unwrap();
        self.notify(1);
        // Wait until the device took it (the tx ring has QSIZE slots).
        let want = self.avail_idx[q];
        wait_for(|| self.mem.read_obj::<u16>(GuestAddress(used(q) + 2)).unwrap() == want);
    }

    fn send(&mut self, op: u16, src_port: u32, dst_port: u32, data: &[u8]) {
        self.send_hdr(
            Hdr {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: data.len() as u32,
                kind: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 256 * 1024,
                fwd_cnt: 0,
            },
            data,
        );
    }

    fn send_hdr(&mut self, h: Hdr, data: &[u8]) {
        let mut p = h.bytes().to_vec();
        p.extend_from_slice(data);
        self.send_raw(&p);
    }

    /// Packets the device put on the rx queue since the last call; the
    /// buffers are offered again.
    fn received(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        let q = 0;
        let mut out = Vec::new();
        let used_idx: u16 = self.mem.read_obj(GuestAddress(used(q) + 2)).unwrap();
        while self.used_seen[q] != used_idx {
            let e = used(q) + 4 + 8 * u64::from(self.used_seen[q] % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(buffer(q, id as u16))).unwrap();
            assert!(b.len() >= HDR_LEN, "short rx packet");
            let h = Hdr::parse(b[..HDR_LEN].try_into().unwrap());
            assert_eq!(h.len as usize, b.len() - HDR_LEN);
            out.push((h, b[HDR_LEN..].to_vec()));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            self.post(0);
        }
        if !out.is_empty() {
            self.notify(0);
        }
        out
    }

    /// Wait for a packet that `pick` accepts; the others are dropped.
    fn expect(&mut self, what: &str, pick: impl Fn(&Hdr) -> bool) -> (Hdr, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = self.received().into_iter().find(|(h, _)| pick(h)) {
                return p;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn event_used(&self) -> u16 {
        self.mem.read_obj(GuestAddress(used(2) + 2)).unwrap()
    }
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Host connects to the guest: CONNECT, REQUEST, RESPONSE, OK, data both
/// ways, then the guest closes and the host sees EOF.
#[test]
fn host_connects_to_guest() {
    let dir = temp_dir("h2g");
    let mut d = Driver::new(&dir);
    d.start();
    let mut host = UnixStream::connect(&d.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let (req, _) = d.expect("REQUEST", |h| h.op == OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid, req.dst_port), (HOST_CID, CID, 1234));
    assert_eq!(req.buf_alloc, BUF_SIZE);
    let host_port = req.src_port;
    d.send(OP_RESPONSE, 1234, host_port, &[]);
    assert_eq!(read_line(&mut host), format!("OK {host_port}"));
    host.write_all(b"hello guest").unwrap();
    let (rw, data) = d.expect("RW", |h| h.op == OP_RW);
    assert_eq!((rw.src_port, rw.dst_port), (host_port, 1234));
    assert_eq!(data, b"hello guest");
    d.send(OP_RW, 1234, host_port, b"hello host");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    // The guest closes: SHUTDOWN both ways; the host reads EOF and the
    // guest gets its RST.
    let mut h = Hdr {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 1234,
        dst_port: host_port,
        kind: TYPE_STREAM,
        op: OP_SHUTDOWN,
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        buf_alloc: 65536,
        ..Hdr::default()
    };
    d.send_hdr(h, &[]);
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    d.expect("RST", |h| h.op == OP_RST && h.src_port == host_port);
    // A packet for the connection now is for an unknown one: reset.
    h.op = OP_RW;
    d.send_hdr(h, &[]);
    d.expect("RST for a closed connection", |h| h.op == OP_RST);
}

/// No guest listener: the guest answers RST, the host socket is closed.
#[test]
fn host_connect_refused_by_guest_closes_the_socket() {
    let dir = temp_dir("h2g-refused");
    let mut d = Driver::new(&dir);
    d.start();
    let mut host = UnixStream::connect(&d.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    let (req, _) = d.expect("REQUEST", |h| h.op == OP_REQUEST);
    d.send(OP_RST, 9, req.src_port, &[]);
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    // A malformed CONNECT line is refused too.
    let mut bad = UnixStream::connect(&d.uds).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"HELLO 9\n").unwrap();
    assert_eq!(bad.read(&mut b).unwrap(), 0);
}

/// The guest connects to host port 52: the listener at `<uds>_52`. Data
/// both ways, then the host closes and the guest hears SHUTDOWN.
#[test]
fn guest_connects_to_host() {
    let dir = temp_dir("g2h");
    let mut d = Driver::new(&dir);
    let listener = UnixListener::bind(dir.0.join("v.sock_52")).unwrap();
    d.start();
    d.send(OP_REQUEST, 4000, 52, &[]);
    let (resp, _) = d.expect("RESPONSE", |h| h.op == OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port, resp.dst_cid), (52, 4000, CID));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    d.send(OP_RW, 4000, 52, b"ping");
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    host.write_all(b"pong").unwrap();
    let (_, data) = d.expect("RW", |h| h.op == OP_RW);
    assert_eq!(data, b"pong");
    drop(host);
    let (sd, _) = d.expect("SHUTDOWN", |h| h.op == OP_SHUTDOWN);
    assert_ne!(sd.flags & SHUTDOWN_SEND, 0);
    // Nobody listens on port 53: reset.
    d.send(OP_REQUEST, 4001, 53, &[]);
    let (rst, _) = d.expect("RST", |h| h.op == OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (53, 4001));
}

/// Large transfers both ways within the credit: every byte arrives, in
/// order, and the device reports its forwarded count so the guest can
/// keep sending.
#[test]
fn bulk_transfer_respects_credit() {
    let dir = temp_dir("bulk");
    let mut d = Driver::new(&dir);
    let listener = UnixListener::bind(dir.0.join("v.sock_7")).unwrap();
    d.start();
    d.send(OP_REQUEST, 5000, 7, &[]);
    d.expect("RESPONSE", |h| h.op == OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    let total = 1 << 20;
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut b = vec![0u8; 65536];
        while got.len() < total {
            let n = host.read(&mut b).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&b[..n]);
        }
        // Then host to guest: 256 KiB.
        let out: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8).collect();
        host.write_all(&out).unwrap();
        (got, host)
    });
    // Guest to host: 1 MiB in 4 KiB packets, never beyond the credit.
    let data: Vec<u8> = (0..total as u32).map(|i| (i % 251) as u8).collect();
    let mut sent = 0usize;
    let mut peer_fwd = 0u32;
    let mut from_host = Vec::new();
    let mut guest_fwd = 0u32;
    while sent < total {
        let credit = BUF_SIZE as usize - (sent - peer_fwd as usize);
        if credit >= 4096 {
            d.send(OP_RW, 5000, 7, &data[sent..sent + 4096]);
            sent += 4096;
            continue;
        }
        let (h, _) = d.expect("CREDIT_UPDATE", |h| h.op == OP_CREDIT_UPDATE || h.op == OP_RW);
        peer_fwd = h.fwd_cnt;
    }
    let (got, _host) = reader.join().unwrap();
    assert!(got == data, "guest to host bytes differ");
    // Host to guest, with the guest granting credit as it consumes.
    while from_host.len() < 256 * 1024 {
        for (h, p) in d.received() {
            if h.op == OP_RW {
                from_host.extend_from_slice(&p);
                guest_fwd = guest_fwd.wrapping_add(p.len() as u32);
            }
        }
        let mut h = Hdr {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 7,
            kind: TYPE_STREAM,
            op: OP_CREDIT_UPDATE,
            buf_alloc: 64 * 1024,
            fwd_cnt: guest_fwd,
            ..Hdr::default()
        };
        h.len = 0;
        d.send_hdr(h, &[]);
        std::thread::sleep(Duration::from_millis(1));
    }
    let want: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8).collect();
    assert!(from_host == want, "host to guest bytes differ");
}

/// A hostile guest: bogus packets, a credit overrun and a connection
/// flood each cost only the connection concerned; another connection
/// keeps working throughout.
#[test]
fn hostile_guest_fails_only_its_connection() {
    let dir = temp_dir("hostile");
    let mut d = Driver::new(&dir);
    let listener = UnixListener::bind(dir.0.join("v.sock_80")).unwrap();
    listener.set_nonblocking(true).unwrap();
    d.start();
    // A healthy connection.
    d.send(OP_REQUEST, 1, 80, &[]);
    d.expect("RESPONSE", |h| h.op == OP_RESPONSE && h.dst_port == 1);
    let mut good = loop {
        if let Ok((s, _)) = listener.accept() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    good.set_nonblocking(false).unwrap();
    good.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    // Bogus packets: wrong source CID (dropped), wrong type, a length
    // longer than the packet, a short header, an unknown op, data for no
    // connection.
    let mut h = Hdr {
        src_cid: 99,
        dst_cid: HOST_CID,
        src_port: 2,
        dst_port: 80,
        kind: TYPE_STREAM,
        op: OP_REQUEST,
        ..Hdr::default()
    };
    d.send_hdr(h, &[]);
    h.src_cid = CID;
    h.kind = 2;
    d.send_hdr(h, &[]);
    d.expect("RST for a bad type", |h| h.op == OP_RST && h.dst_port == 2);
    h.kind = TYPE_STREAM;
    h.op = OP_RW;
    h.len = 1000;
    d.send_hdr(h, b"short");
    d.expect("RST for a bad length", |h| h.op == OP_RST && h.dst_port == 2);
    d.send_raw(&[1, 2, 3]);
    h.op = 77;
    h.len = 0;
    d.send_hdr(h, &[]);
    d.expect("RST for an unknown op", |h| h.op == OP_RST && h.dst_port == 2);

    // A credit overrun: the host does not read; the guest sends more than
    // 64 KiB. The host's socket buffer takes some, our buffer the rest;
    // beyond that the connection is reset.
    d.send(OP_REQUEST, 3, 80, &[]);
    d.expect("RESPONSE", |h| h.op == OP_RESPONSE && h.dst_port == 3);
    let _stalled = loop {
        if let Ok((s, _)) = listener.accept() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let chunk = vec![7u8; 4096];
    let mut reset = false;
    for _ in 0..1024 {
        d.send(OP_RW, 3, 80, &chunk);
        if d.received().iter().any(|(h, _)| h.op == OP_RST && h.dst_port == 3) {
            reset = true;
            break;
        }
    }
    if !reset {
        d.expect("RST for a credit overrun", |h| h.op == OP_RST && h.dst_port == 3);
    }

    // A flood of requests: beyond the limit, resets.
    let mut accepted = Vec::new();
    let mut answers = 0;
    let mut resets = 0;
    for port in 0..(MAX_CONNECTIONS as u32 + 40) {
        d.send(OP_REQUEST, 10_000 + port, 80, &[]);
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
        for (h, _) in d.received() {
            match h.op {
                OP_RESPONSE => answers += 1,
                OP_RST => resets += 1,
                _ => {}
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while answers + resets < MAX_CONNECTIONS + 40 && Instant::now() < deadline {
        for (h, _) in d.received() {
            match h.op {
                OP_RESPONSE => answers += 1,
                OP_RST => resets += 1,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(answers + resets, MAX_CONNECTIONS + 40, "every request answered");
    assert!(answers < MAX_CONNECTIONS, "{answers} connections beyond the limit");
    assert!(resets >= 40, "only {resets} requests refused");

    // The healthy connection still works.
    d.send(OP_RW, 1, 80, b"still here");
    let mut b = [0u8; 10];
    good.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still here");
    // And the device is not marked broken.
    assert_eq!(d.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}

/// A host client that never finishes its CONNECT line, and a guest that
/// never answers a request, are given up after the timeout.
#[test]
fn set_ups_time_out() {
    let dir = temp_dir("timeout");
    let mut d = Driver::new(&dir);
    d.start();
    let mut silent = UnixStream::connect(&d.uds).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    silent.write_all(b"CONN").unwrap();
    let mut unanswered = UnixStream::connect(&d.uds).unwrap();
    unanswered.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    unanswered.write_all(b"CONNECT 5\n").unwrap();
    let (req, _) = d.expect("REQUEST", |h| h.op == OP_REQUEST);
    let mut b = [0u8; 4];
    assert_eq!(silent.read(&mut b).unwrap(), 0);
    assert_eq!(unanswered.read(&mut b).unwrap(), 0);
    d.expect("RST after the timeout", |h| {
        h.op == OP_RST && h.src_port == req.src_port
    });
}

/// Across a snapshot: the listening socket is bound again, connections
/// are gone, and the driver gets a TRANSPORT_RESET event.
#[test]
fn restore_resets_the_transport_and_keeps_listening() {
    use crate::persist::Persist;
    let dir = temp_dir("restore");
    let mut d = Driver::new(&dir);
    d.start();
    let listener = UnixListener::bind(dir.0.join("v.sock_52")).unwrap();
    d.send(OP_REQUEST, 4000, 52, &[]);
    d.expect("RESPONSE", |h| h.op == OP_RESPONSE);
    let (mut old_conn, _) = listener.accept().unwrap();
    old_conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    d.t.pause();
    let transport = d.t.state();
    let saved = Vsock::new(CID, &dir.0.join("other.sock")).unwrap().save();
    assert_eq!(saved.guest_cid, CID);
    let device_state = super::VsockState {
        guest_cid: CID,
        uds_path: d.uds.clone(),
    };
    let Driver {
        mem,
        t,
        avail_idx,
        used_seen,
        uds,
    } = d;
    drop(t);
    // The old VMM is gone: its connection closed, its socket file removed.
    let mut b = [0u8; 1];
    assert_eq!(old_conn.read(&mut b).unwrap(), 0);
    assert!(!uds.exists());

    let dev = Vsock::restore((), &device_state).unwrap();
    let mut t = MmioTransport::new(
        Box::new(dev),
        mem.clone(),
        Arc::new(Interrupt::new(Arc::new(Line::default()))),
        crate::virtio::no_dma_observer(),
    )
    .unwrap();
    t.restore_state(&transport).unwrap();
    t.resume();
    let mut d = Driver {
        mem,
        t,
        avail_idx,
        used_seen,
        uds,
    };
    wait_for(|| d.event_used() == 1);
    let id: u32 = d.mem.read_obj(GuestAddress(buffer(2, 0))).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    // Linux's driver reads guest_cid from the config space on that event,
    // while the worker runs: the read must not wait for the worker (it
    // did, and a restored Linux guest hung in that read).
    let (tx, rx) = std::sync::mpsc::channel();
    let mut t = d.t;
    std::thread::spawn(move || {
        let mut cid = [0u8; 8];
        t.read(VIRTIO_MMIO_CONFIG as u64, &mut cid);
        let _ = tx.send((u64::from_le_bytes(cid), t));
    });
    let (cid, t) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("reading guest_cid while the worker runs blocked");
    assert_eq!(cid, CID);
    d.t = t;
    // Until the driver gives the event buffer back (Linux does once it
    // has reset its sockets), nothing reaches it: a host connection made
    // now would be reset with the old ones.
    let mut early = UnixStream::connect(&d.uds).unwrap();
    early.write_all(b"CONNECT 78\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        d.received().is_empty(),
        "a packet reached the guest before it handled the reset"
    );
    d.post(2);
    d.notify(2);
    d.expect("REQUEST after the reset was handled", |h| {
        h.op == OP_REQUEST && h.dst_port == 78
    });
    // The old connection is unknown now: the guest gets a reset.
    d.send(OP_RW, 4000, 52, b"x");
    d.expect("RST for a connection from before", |h| h.op == OP_RST);
    // Both directions work again.
    d.send(OP_REQUEST, 4001, 52, &[]);
    d.expect("RESPONSE", |h| h.op == OP_RESPONSE && h.dst_port == 4001);
    let mut host = UnixStream::connect(&d.uds).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    d.expect("REQUEST", |h| h.op == OP_REQUEST && h.dst_port == 77);
}

/// Failover's output gate holding: the guest's bytes reach the host
/// socket only when their epoch is released, its shutdown never overtakes
/// them, and held bytes count against the connection's credit (a guest
/// that sends beyond it is reset, as without a gate).
#[test]
fn held_output_waits_for_its_epoch_and_counts_against_the_credit() {
    use crate::migration::failover::OutputGate;
    use crate::virtio::VirtioDevice;
    let dir = temp_dir("gate");
    let uds = dir.0.join("v.sock");
    let mut dev = Vsock::new(CID, &uds).unwrap();
    let gate = Arc::new(OutputGate::default());
    dev.set_output_gate(gate.clone());
    gate.hold();
    let mut d = Driver::with_device(dev, uds);
    let listener = UnixListener::bind(dir.0.join("v.sock_9")).unwrap();
    d.start();
    // Connection A: data, then the guest closes both ways.
    d.send(OP_REQUEST, 6000, 9, &[]);
    d.expect("RESPONSE", |h| h.op == OP_RESPONSE && h.dst_port == 6000);
    let (mut a, _) = listener.accept().unwrap();
    a.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    d.send(OP_RW, 6000, 9, b"ping");
    let mut shutdown = Hdr {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 6000,
        dst_port: 9,
        kind: TYPE_STREAM,
        op: OP_SHUTDOWN,
        flags: SHUTDOWN_SEND | SHUTDOWN_RCV,
        buf_alloc: 64 * 1024,
        ..Hdr::default()
    };
    shutdown.len = 0;
    d.send_hdr(shutdown, &[]);
    let mut b = [0u8; 8];
    let e = a.read(&mut b).expect_err("held bytes or the close reached the host");
    assert!(
        matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        "{e}"
    );
    // Connection B: the credit counts the held bytes.
    d.send(OP_REQUEST, 6001, 9, &[]);
    d.expect("RESPONSE", |h| h.op == OP_RESPONSE && h.dst_port == 6001);
    let (_b, _) = listener.accept().unwrap();
    let chunk = vec![7u8; 4096];
    for _ in 0..BUF_SIZE as usize / 4096 {
        d.send(OP_RW, 6001, 9, &chunk);
    }
    assert_eq!(gate.held_bytes(), 4 + u64::from(BUF_SIZE));
    d.send(OP_RW, 6001, 9, b"x");
    d.expect("RST for the credit overrun", |h| h.op == OP_RST && h.dst_port == 6001);
    // The epoch is acknowledged: A's bytes, then its close.
    gate.mark(1);
    gate.release(1);
    a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    a.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"ping");
}
