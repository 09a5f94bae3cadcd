//! The control plane's two start-up figures, side by side with QEMU in the
//! same run:
//!   1. process start → control socket ready: Vessel's API socket answering
//!      `GET /`, against QEMU's QMP socket greeting (`-S`, nothing run yet);
//!   2. start request → the guest's init marker (`VESSEL-GUEST-READY`):
//!      Vessel's `PUT /actions InstanceStart` against QEMU's QMP `cont` on a
//!      VM created stopped (`-S`), same kernel and initramfs.
//!
//! Firecracker's specification targets ≤ 125 ms to init and about 12 ms to
//! a ready VMM (on KVM); these runs are emu against QEMU TCG.
//!
//! Usage: cargo run --release -p vessel-bench --bin api_start -- [RUNS]
//! (after `cargo build --release -p vessel` and `guest/build-all.sh`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vessel::api::client;
use vessel_bench::{b64, cache, default_kernel, median, qemu_guest, vessel_binary};

const MARKER: &str = "VESSEL-GUEST-READY";

/// Report on `tx` the moment a line with the marker appears on `child`'s stdout.
fn watch_marker(child: &mut Child) -> mpsc::Receiver<Instant> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains(MARKER) {
                let _ = tx.send(Instant::now());
            }
        }
    });
    rx
}

fn wait_until(deadline: Duration, mut ready: impl FnMut() -> bool) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if ready() {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

fn vessel_run(dir: &Path, cmdline: &str) -> (f64, f64) {
    let sock = dir.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let mut child = Command::new(vessel_binary())
        .arg("run")
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vessel");
    let marker = watch_marker(&mut child);
    let ready = wait_until(Duration::from_secs(10), || {
        client::request(&sock, "GET", "/", None, Duration::from_secs(1)).is_ok_and(|r| r.status == 200)
    })
    .expect("Vessel's API never answered");
    let put = |path: &str, body: String| {
        let r = client::request(&sock, "PUT", path, Some(&body), Duration::from_secs(10)).expect("API request");
        assert_eq!(r.status, 204, "PUT {path}: {}", r.body);
    };
    put(
        "/boot-source",
        serde_json::json!({
            "kernel_image_path": default_kernel(),
            "initrd_path": cache().join("initramfs.cpio.gz"),
            "boot_args": cmdline,
        })
        .to_string(),
    );
    put(
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256, "accel": "emu"}"#.into(),
    );
    let start = Instant::now();
    put("/actions", r#"{"action_type": "InstanceStart"}"#.into());
    let seen = marker
        .recv_timeout(Duration::from_secs(60))
        .expect("no marker from Vessel");
    let _ = child.kill();
    let _ = child.wait();
    ((ready - t0).as_secs_f64() * 1e3, (seen - start).as_secs_f64() * 1e3)
}

fn qmp_line(r: &mut BufReader<UnixStream>) -> String {
    let mut s = String::new();
    let _ = r.read_line(&mut s);
    s
}

fn qemu_run(dir: &Path, cmdline: &str) -> (f64, f64) {
    let sock = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let mut cmd = qemu_guest(&default_kernel(), cmdline);
    cmd.arg("-S")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    let marker = watch_marker(&mut child);
    let mut stream = None;
    let ready = wait_until(Duration::from_secs(10), || {
        let Ok(s) = UnixStream::connect(&sock) else {
            return false;
        };
        let mut r = BufReader::new(s);
        let greeting = qmp_line(&mut r);
        let ok = greeting.contains("QMP");
        stream = Some(r);
        ok
    })
    .expect("QEMU's QMP never answered");
    let mut r = stream.expect("QMP stream");
    let mut send = |cmd: &str| {
        r.get_mut().write_all(cmd.as_bytes()).expect("QMP write");
        qmp_line(&mut r)
    };
    send("{\"execute\": \"qmp_capabilities\"}\n");
    let start = Instant::now();
    send("{\"execute\": \"cont\"}\n");
    let seen = marker
        .recv_timeout(Duration::from_secs(60))
        .expect("no marker from QEMU");
    let _ = child.kill();
    let _ = child.wait();
    let _ = r.get_mut().read(&mut [0u8; 1]);
    ((ready - t0).as_secs_f64() * 1e3, (seen - start).as_secs_f64() * 1e3)
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("vessel-api-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    // The command never runs: each run stops at the marker.
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 vessel.cmd={}", b64("true"));
    let (mut vr, mut vb, mut qr, mut qb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let (r1, b1) = vessel_run(&dir, &cmdline);
        let (r2, b2) = qemu_run(&dir, &cmdline.replace("reboot=k", "reboot=t"));
        println!(
            "run {}: vessel ready {r1:.1} ms, start→init {b1:.0} ms; qemu ready {r2:.1} ms, cont→init {b2:.0} ms",
            i + 1
        );
        vr.push(r1);
        vb.push(b1);
        qr.push(r2);
        qb.push(b2);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (mvr, mvb, mqr, mqb) = (median(&mut vr), median(&mut vb), median(&mut qr), median(&mut qb));
    println!(
        "median process start → control socket ready: vessel {mvr:.1} ms, qemu (QMP) {mqr:.1} ms, ratio {:.2}",
        mvr / mqr
    );
    println!(
        "median start request → init marker: vessel (emu, InstanceStart) {mvb:.0} ms, qemu (tcg, QMP cont) {mqb:.0} ms, ratio {:.2}",
        mvb / mqb
    );
}
