//! Shared pieces of the side-by-side benchmarks: where the guest artifacts
//! are, the two VMMs' command lines for the same guest, and how a command
//! reaches the guest's /init.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn cache() -> PathBuf {
    std::env::var_os("VESSEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel"))
}

/// The release `vessel` binary of this checkout.
pub fn vessel_binary() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/vessel");
    assert!(p.exists(), "build Vessel first: cargo build --release -p vessel");
    p
}

/// Base64, for `vessel.cmd=` (the guest's /init decodes it).
pub fn b64(s: &str) -> String {
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

/// The minimal guest's kernel.
pub fn default_kernel() -> PathBuf {
    cache().join("kernel/vmlinux")
}

/// `vessel run` of `kernel` with the test initramfs (engine emu, 256 MiB).
pub fn vessel_guest(kernel: &Path, cmdline: &str) -> Command {
    vessel_guest_with(kernel, &cache().join("initramfs.cpio.gz"), cmdline)
}

/// `vessel run` of `kernel` with `initrd` (engine emu, 256 MiB), plus the
/// words of `VESSEL_BENCH_ARGS` (e.g. `--jit off`, passed by scripts/bench-emu
/// when this `vessel` has the flag).
pub fn vessel_guest_with(kernel: &Path, initrd: &Path, cmdline: &str) -> Command {
    let mut c = Command::new(vessel_binary());
    c.args(["run", "--accel", "emu", "--mem", "256M"])
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--cmdline")
        .arg(cmdline);
    if let Ok(extra) = std::env::var("VESSEL_BENCH_ARGS") {
        c.args(extra.split_whitespace());
    }
    c
}

/// The reference QEMU (DESIGN.md: TCG, microvm, no ACPI) on the same guest.
pub fn qemu_guest(kernel: &Path, cmdline: &str) -> Command {
    qemu_guest_with(kernel, &cache().join("initramfs.cpio.gz"), cmdline)
}

/// QEMU (TCG, microvm, no ACPI) on `kernel` with `initrd`.
pub fn qemu_guest_with(kernel: &Path, initrd: &Path, cmdline: &str) -> Command {
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
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", cmdline]);
    c
}

/// A virtio-blk disk on QEMU's microvm.
pub fn qemu_disk(c: &mut Command, id: &str, path: &Path, format: &str, read_only: bool) {
    let ro = if read_only { ",readonly=on" } else { "" };
    c.arg("-drive")
        .arg(format!("id={id},file={},format={format},if=none{ro}", path.display()))
        .args(["-device", &format!("virtio-blk-device,drive={id}")]);
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Connect to QEMU's QMP socket at `sock` (waiting up to 10 s for it) and
/// leave capabilities negotiation behind.
pub fn qmp(sock: &Path) -> std::io::BufReader<std::os::unix::net::UnixStream> {
    use std::io::BufRead;
    let start = std::time::Instant::now();
    loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(sock) {
            let mut r = std::io::BufReader::new(s);
            let mut greeting = String::new();
            let _ = r.read_line(&mut greeting);
            qmp_cmd(&mut r, r#"{"execute": "qmp_capabilities"}"#);
            return r;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "no QMP");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Send a QMP command and return its answer (skipping events); `Null`
/// when QEMU closed the socket.
pub fn qmp_cmd(r: &mut std::io::BufReader<std::os::unix::net::UnixStream>, cmd: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    r.get_mut().write_all(cmd.as_bytes()).expect("QMP");
    r.get_mut().write_all(b"\n").expect("QMP");
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return serde_json::Value::Null;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v.get("return").is_some() || v.get("error").is_some() {
            return v;
        }
    }
}
