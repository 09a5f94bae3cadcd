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
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn cache() -> PathBuf {
    std::env::var_os("VESSEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel"))
}

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() {
                T[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let mib: u64 = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(256);
    let cache = cache();
    let kernel = cache.join("kernel/vmlinux");
    let initrd = cache.join("initramfs.cpio.gz");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let vessel = root.join("target/release/vessel");
    assert!(vessel.exists(), "build Vessel first: cargo build --release -p vessel");
    let image = std::env::temp_dir().join(format!("vessel-bench-disk-{}.img", std::process::id()));
    let guest_cmd = b64(&format!(
        "echo DISK-W0; dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/dev/null; echo DISK-W1; \
         dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null; echo DISK-R1"
    ));
    let vessel_cmd = || {
        let mut c = Command::new(&vessel);
        c.args(["run", "--accel", "emu", "--mem", "256M"])
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--disk")
            .arg(format!("path={}", image.display()))
            .arg("--cmdline")
            .arg(format!("console=ttyS0 reboot=k vessel.cmd={guest_cmd}"));
        c
    };
    let qemu_cmd = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "tcg",
            "-M",
            "microvm,x-option-roms=off,acpi=off",
            "-cpu",
            "qemu64",
            "-m",
            "256M",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-drive")
        .arg(format!("id=d0,file={},format=raw,if=none", image.display()))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .args(["-append", &format!("console=ttyS0 reboot=t vessel.cmd={guest_cmd}")]);
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
