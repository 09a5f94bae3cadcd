//! Sequential disk throughput, side by side: the minimal guest writes and
//! then reads 256 MiB on its virtio-blk disk (a raw file) with direct I/O,
//! under Vessel (engine emu) and under QEMU (TCG, microvm,
//! virtio-blk-device on the same kind of image), runs alternating, in one
//! invocation. Each phase is timed on the host between marker lines the
//! guest prints.
//!
//! Usage: cargo run --release -p vessel-bench --bin disk -- [RUNS] [MIB]
//! (after `cargo build --release -p vessel` and `guest/build-all.sh`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use vessel_bench::{b64, default_kernel, median, qemu_disk, qemu_guest, vessel_guest};

/// Run the guest; returns (write MB/s, read MB/s).
fn measure(mut cmd: Command, mib: u64) -> (f64, f64) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the VMM");
    let out = child.stdout.take().expect("stdout");
    let mut marks = std::collections::HashMap::new();
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        let t = line.trim();
        if ["DISK-W0", "DISK-W1", "DISK-R1"].contains(&t) {
            marks.insert(t.to_string(), Instant::now());
            if t == "DISK-R1" {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let at = |k: &str| *marks.get(k).unwrap_or_else(|| panic!("the guest never printed {k}"));
    let mb = (mib << 20) as f64 / 1e6;
    let w = mb / (at("DISK-W1") - at("DISK-W0")).as_secs_f64();
    let r = mb / (at("DISK-R1") - at("DISK-W1")).as_secs_f64();
    (w, r)
}

fn fresh_image(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).expect("image");
    f.set_len((mib + 16) << 20).expect("image size");
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let mib: u64 = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(256);
    let image = std::env::temp_dir().join(format!("vessel-bench-disk-{}.img", std::process::id()));
    let guest_cmd = b64(&format!(
        "echo DISK-W0; dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/dev/null; echo DISK-W1; \
         dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null; echo DISK-R1"
    ));
    let cmdline_tail = format!("vessel.cmd={guest_cmd}");
    let vessel_cmd = || {
        let mut c = vessel_guest(&default_kernel(), &format!("console=ttyS0 reboot=k {cmdline_tail}"));
        c.arg("--disk").arg(format!("path={}", image.display()));
        c
    };
    let qemu_cmd = || {
        let mut c = qemu_guest(&default_kernel(), &format!("console=ttyS0 reboot=t {cmdline_tail}"));
        qemu_disk(&mut c, "d0", &image, "raw", false);
        c
    };
    let (mut vw, mut vr, mut qw, mut qr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        fresh_image(&image, mib);
        let (w, r) = measure(vessel_cmd(), mib);
        vw.push(w);
        vr.push(r);
        fresh_image(&image, mib);
        let (w2, r2) = measure(qemu_cmd(), mib);
        qw.push(w2);
        qr.push(r2);
        println!(
            "run {}: vessel write {w:.1} MB/s read {r:.1} MB/s; qemu write {w2:.1} MB/s read {r2:.1} MB/s",
            i + 1
        );
    }
    let _ = std::fs::remove_file(&image);
    let (vw, vr, qw, qr) = (median(&mut vw), median(&mut vr), median(&mut qw), median(&mut qr));
    println!("sequential {mib} MiB, 1 MiB blocks, O_DIRECT in the guest, raw image; medians of {runs} runs:");
    println!(
        "  write: vessel (emu) {vw:.1} MB/s, qemu (tcg, microvm) {qw:.1} MB/s, ratio vessel/qemu {:.2}",
        vw / qw
    );
    println!(
        "  read:  vessel (emu) {vr:.1} MB/s, qemu (tcg, microvm) {qr:.1} MB/s, ratio vessel/qemu {:.2}",
        vr / qr
    );
}
