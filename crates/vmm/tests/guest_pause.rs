//! A quiescent pause of the real guest: while the guest keeps a virtio-blk
//! disk and a virtio-net link busy, pause, and check that neither guest
//! memory nor any device's state changes for two seconds; then resume and
//! check the guest's disk and network work completed correctly. Needs the
//! guest artifacts and root (a TAP in a network namespace).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guest_config, tail, Guest, NetNs, Scratch};
use vmm::machine::{DiskConfig, NetConfig, RunOutcome};

/// Reproducible incompressible bytes (xorshift).
fn payload(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What the guest writes to each 128 KiB slot of the disk.
fn disk_pattern() -> Vec<u8> {
    let text: String = (1..=30000).map(|i| format!("{i}\n")).collect();
    text.as_bytes()[..128 << 10].to_vec()
}

const ROUNDS: usize = 60;

#[test]
fn pause_is_quiescent_under_disk_and_network_load() {
    let ns = NetNs::new("pause", "vtap0", "10.79.0.1/24");
    let dir = Scratch::new("pause");
    let image = dir.blank("disk.img", 64 << 20);

    // The host side of the network: a TCP peer that sends a payload and
    // takes it back, and a UDP stream into the guest that never stops
    // (while paused, its datagrams wait in the TAP's kernel queue).
    let data = payload(1 << 20);
    let to_guest = data.clone();
    let tcp = ns.spawn(move || {
        let down = TcpListener::bind("10.79.0.1:5000").unwrap();
        let up = TcpListener::bind("10.79.0.1:5001").unwrap();
        let (mut s, _) = down.accept().unwrap();
        s.write_all(&to_guest).unwrap();
        drop(s);
        let (mut s, _) = up.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(200))).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        back
    });
    let stop_udp = Arc::new(AtomicBool::new(false));
    let udp_sent = Arc::new(AtomicU64::new(0));
    let udp = {
        let (stop, sent) = (stop_udp.clone(), udp_sent.clone());
        ns.spawn(move || {
            let s = UdpSocket::bind("10.79.0.1:0").unwrap();
            while !stop.load(Ordering::Acquire) {
                if s.send_to(&[0x5a; 200], "10.79.0.2:7000").is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    // The guest: a loop of direct writes to the disk, each checked by
    // reading it back, and a TCP round trip of 1 MiB, side by side.
    let cmd = format!(
        "ip addr add 10.79.0.2/24 dev eth0 && ip link set eth0 up && \
         seq 1 30000 | head -c 131072 > /tmp/pat && \
         ( i=0; while [ $i -lt {ROUNDS} ]; do \
             dd if=/tmp/pat of=/dev/vda bs=64k seek=$((i*2)) oflag=direct conv=notrunc 2>/dev/null || exit 1; \
             dd if=/dev/vda bs=64k skip=$((i*2)) count=2 iflag=direct 2>/dev/null | cmp -s - /tmp/pat || exit 2; \
             i=$((i+1)); done; echo DISK-DONE ) > /tmp/disk.log 2>&1 & \
         disk=$! && \
         ( n=0; until nc 10.79.0.1 5000 > /tmp/r; do n=$((n+1)); [ $n -lt 20 ] || exit 1; sleep 0.3; done; \
           nc 10.79.0.1 5001 < /tmp/r && echo NET-DONE ) > /tmp/net.log 2>&1 & \
         net=$! && echo WORK-STARTED && \
         wait $disk; echo disk-status=$?; wait $net; echo net-status=$?; cat /tmp/disk.log /tmp/net.log"
    );
    let mut cfg = guest_config(&cmd, "reboot");
    cfg.disks.push(DiskConfig {
        path: image.clone(),
        read_only: false,
        allow_absolute_backing: false,
        format: None,
    });
    cfg.nets.push(NetConfig {
        id: None,
        tap: Some("vtap0".into()),
        mac: Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x57]),
    });
    let guest = Guest::boot(cfg, Some(&ns.path()));
    guest.wait_for("WORK-STARTED");

    for (round, hold) in [(1, Duration::from_secs(2)), (2, Duration::from_millis(500))] {
        std::thread::sleep(Duration::from_millis(700));
        let t0 = Instant::now();
        assert!(guest.vm.pause(Duration::from_secs(10)), "pause {round} timed out");
        let took = t0.elapsed();
        assert!(guest.vm.is_paused());
        let (mem0, dev0) = (guest.vm.guest_memory_digest(), guest.vm.device_states());
        let console0 = guest.console.text();
        let udp0 = udp_sent.load(Ordering::Relaxed);
        std::thread::sleep(hold);
        let (mem1, dev1) = (guest.vm.guest_memory_digest(), guest.vm.device_states());
        assert!(
            udp_sent.load(Ordering::Relaxed) > udp0,
            "the host sent nothing while paused: the test proves less than it claims"
        );
        assert_eq!(dev0, dev1, "device state changed while paused (round {round})");
        assert_eq!(mem0, mem1, "guest memory changed while paused (round {round})");
        assert_eq!(console0, guest.console.text(), "the guest printed while paused");
        // The devices were busy: their queues have moved.
        assert_eq!(dev0.len(), 2);
        for (i, d) in dev0.iter().enumerate() {
            assert!(
                d.queues.iter().any(|q| q.next_used > 0),
                "device {i} served nothing before pause {round}: {d:?}"
            );
            for q in &d.queues {
                assert_eq!(q.next_avail, q.next_used, "device {i}: a request left half done: {q:?}");
            }
        }
        eprintln!("pause {round}: took {took:?}; held {hold:?} with memory and device state unchanged");
        guest.vm.resume();
        assert!(!guest.vm.is_paused());
    }

    guest.wait_for("VESSEL-CMD-EXIT=");
    let log = guest.console.clone();
    let outcome = guest.finish(Duration::from_secs(120));
    stop_udp.store(true, Ordering::Release);
    let _ = udp.join();
    let text = log.text();
    assert_eq!(outcome, RunOutcome::Reset, "{}", tail(&text));
    for want in [
        "DISK-DONE",
        "NET-DONE",
        "disk-status=0",
        "net-status=0",
        "VESSEL-CMD-EXIT=0",
    ] {
        assert!(text.contains(want), "no {want:?} on the console:\n{}", tail(&text));
    }
    let back = tcp.join().expect("the TCP peer failed");
    assert!(
        back == data,
        "the bytes that came back over TCP differ ({} bytes)",
        back.len()
    );
    let img = std::fs::read(&image).unwrap();
    let pat = disk_pattern();
    for i in 0..ROUNDS {
        assert!(
            img[i * pat.len()..(i + 1) * pat.len()] == pat[..],
            "disk slot {i} does not hold the pattern"
        );
    }
}
