//! Debian with systemd to multi-user, side by side: Debian's stock kernel
//! and its initramfs (guest/build-debian-initramfs.sh) switch to an ext4
//! root on a read-only virtio-blk disk that holds a minimal Debian 12 with
//! systemd (guest/build-debian-systemd.sh); a unit ordered after
//! multi-user.target prints `VESSEL-MULTI-USER`. Wall time from process
//! start to that line, QEMU (TCG, microvm with ACPI, so the kernel finds
//! the virtio-mmio devices as under Vessel; Debian's virtio_mmio has no
//! command-line devices) then Vessel (engine emu), 512 MiB, one vCPU, runs
//! alternating in one invocation.
//!
//! Usage: cargo run --release -p vessel-bench --bin systemd_boot -- [RUNS]
//! Prints `RATIO systemd X` (Vessel/QEMU) for scripts/bench-emu.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vessel_bench::{cache, median, vessel_binary};

const MARKER: &str = "VESSEL-MULTI-USER";
/// A boot that has not reached multi-user by then is stuck: QEMU (run
/// first, so a stuck reference costs minutes, not the interpreter's boot)
/// and Vessel.
const QEMU_LIMIT: Duration = Duration::from_secs(300);
const VESSEL_LIMIT: Duration = Duration::from_secs(1800);

/// Start `cmd`, return the time until its stdout shows the marker, then
/// kill it; `Err` with the last console lines when it never does.
fn time_to_marker(mut cmd: Command, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let out = child.stdout.take().expect("piped stdout");
    let id = child.id();
    // The VMM is killed at the limit, which ends the read loop below.
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        // SAFETY: kill(2) on the child's pid; at worst the pid is gone.
        unsafe { libc::kill(id as i32, libc::SIGKILL) };
    });
    let mut tail = std::collections::VecDeque::new();
    let mut found = None;
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if line.contains(MARKER) {
            found = Some(start.elapsed());
            break;
        }
        tail.push_back(line);
        if tail.len() > 15 {
            tail.pop_front();
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found.ok_or_else(|| {
        format!(
            "no {MARKER} within {} s; last lines:\n{}",
            limit.as_secs(),
            Vec::from(tail).join("\n")
        )
    })
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1).max(1);
    let dir = cache().join("debian");
    let (kernel, initrd, root) = (
        dir.join("vmlinux"),
        dir.join("initramfs.cpio.gz"),
        dir.join("systemd-root.ext4"),
    );
    for need in [&kernel, &initrd, &root] {
        if !need.exists() {
            eprintln!(
                "error: missing {}: run WITH_DEBIAN_KERNEL=1 guest/build-all.sh and guest/build-debian-systemd.sh",
                need.display()
            );
            std::process::exit(2);
        }
    }
    let cmdline = |reboot: &str| format!("console=ttyS0 reboot={reboot} panic=-1 root=/dev/vda ro");
    let vessel = || {
        let mut c = Command::new(vessel_binary());
        c.args(["run", "--accel", "emu", "--mem", "512M", "--kernel"])
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--disk")
            .arg(format!("path={},readonly=on", root.display()))
            .arg("--cmdline")
            .arg(cmdline("k"));
        if let Ok(extra) = std::env::var("VESSEL_BENCH_ARGS") {
            c.args(extra.split_whitespace());
        }
        c
    };
    let qemu = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "tcg",
            "-M",
            // With a disk attached, the option ROMs are what boots
            // -kernel (without them the firmware tries the disk); one
            // IOAPIC, as Vessel has.
            "microvm,acpi=on,ioapic2=off",
            "-cpu",
            "qemu64",
            "-m",
            "512M",
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
        // Under microvm with ACPI, Debian's kernel finds neither a PIT
        // that calibrates nor HPET or a PM timer, and waits forever for the
        // TSC and loop calibration: give it both, as `tsc_early_khz` and
        // `lpj` are meant for. Vessel offers the TSC rate in CPUID 0x15.
        .args([
            "-append",
            &format!("{} tsc_early_khz=2000000 lpj=4000000 hpet=disable", cmdline("t")),
        ]);
        vessel_bench::qemu_disk(&mut c, "root", &root, "raw", true);
        c
    };
    let (mut v, mut q) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let one = |who: &str, cmd: Command, limit: Duration| {
            time_to_marker(cmd, limit).unwrap_or_else(|e| {
                eprintln!("error: {who}: {e}");
                std::process::exit(1)
            })
        };
        let tq = one("qemu", qemu(), QEMU_LIMIT);
        let tv = one("vessel", vessel(), VESSEL_LIMIT);
        println!(
            "run {}: vessel {:.2} s, qemu {:.2} s",
            i + 1,
            tv.as_secs_f64(),
            tq.as_secs_f64()
        );
        v.push(tv.as_secs_f64());
        q.push(tq.as_secs_f64());
    }
    let (mv, mq) = (median(&mut v), median(&mut q));
    println!(
        "median boot to multi-user: vessel (emu) {mv:.2} s, qemu (tcg, microvm) {mq:.2} s, ratio vessel/qemu {:.2}",
        mv / mq
    );
    println!("RATIO systemd {:.2}", mv / mq);
}
