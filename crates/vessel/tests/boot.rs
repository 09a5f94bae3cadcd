//! End-to-end tests: the real `vessel` binary boots the real guest built by
//! `guest/` (kernel, busybox initramfs) under the `emu` engine.
//!
//! The guest artifacts come from `guest/build-all.sh` (run by
//! `scripts/test-all` first), cached in `$VESSEL_CACHE` or
//! `~/.cache/vessel`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{artifact, assert_clean_run, b64, stdout, vessel, TimedOutput, Watchdog};

/// Boot `kernel` with the minimal initramfs, run `cmd` in the guest, and
/// wait for Vessel to exit.
fn boot(kernel: &str, cpus: u32, mem: &str, cmd: &str, end: &str) -> Output {
    common::guest_on(kernel, cpus, mem, cmd, end)
        .timed_output()
        .expect("run vessel")
}

#[test]
fn boots_one_vcpu_and_runs_a_command() {
    // The guest computes the answer, so an echo of the command line cannot pass.
    let o = boot(
        "kernel/vmlinux",
        1,
        "256M",
        "echo answer=$((6*7)); grep -c ^processor /proc/cpuinfo",
        "reboot",
    );
    assert_clean_run(&o);
    let s = stdout(&o);
    assert!(s.contains("answer=42"), "{s}");
    assert!(s.lines().any(|l| l.trim() == "1"), "expected 1 CPU:\n{s}");
}

#[test]
fn boots_with_the_jit_and_runs_a_command() {
    // The whole boot and the command with emu's JIT tier on; -v reports
    // what the JIT did, so a run that translated nothing fails.
    let o = common::guest_on(
        "kernel/vmlinux",
        1,
        "256M",
        "echo answer=$((6*7)); i=0; s=0; while [ $i -lt 2000 ]; do s=$((s+i*i)); i=$((i+1)); done; echo sum=$s",
        "reboot",
    )
    .args(["--jit", "on", "-v"])
    .timed_output()
    .expect("run vessel");
    assert_clean_run(&o);
    let s = stdout(&o);
    assert!(s.contains("answer=42"), "{s}");
    assert!(s.contains("sum=2664667000"), "{s}");
    let log = String::from_utf8_lossy(&o.stderr);
    let jit = log
        .lines()
        .find_map(|l| l.split_once("JIT: ").map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("no JIT report in the log:\n{log}"));
    let blocks: u64 = jit.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(blocks > 0, "the JIT translated nothing: {jit}");
}

#[test]
fn boots_two_vcpus() {
    let o = boot(
        "kernel/vmlinux",
        2,
        "256M",
        "grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online",
        "reboot",
    );
    assert_clean_run(&o);
    let s = stdout(&o);
    assert!(s.lines().any(|l| l.trim() == "2"), "expected 2 CPUs:\n{s}");
    assert!(s.lines().any(|l| l.trim() == "0-1"), "both CPUs online:\n{s}");
}

#[test]
fn boots_a_bzimage() {
    let o = boot("kernel/bzImage", 1, "256M", "echo bz=$((1+1))", "reboot");
    assert_clean_run(&o);
    assert!(stdout(&o).contains("bz=2"));
}

#[test]
fn power_off_exits_zero() {
    // Without ACPI the kernel turns power-off into a halt of every vCPU with
    // interrupts disabled; Vessel treats that as the machine switching off.
    let o = boot("kernel/vmlinux", 2, "256M", "true", "halt");
    assert_clean_run(&o);
    assert!(stdout(&o).contains("System halted"), "{}", stdout(&o));
}

#[test]
fn reboot_exits_zero() {
    let o = boot("kernel/vmlinux", 1, "256M", "true", "reboot");
    assert_clean_run(&o);
    assert!(stdout(&o).contains("reboot: Restarting system"));
}

/// The guest's clock runs at the host's pace: across a `sleep 1`, the
/// guest's uptime advances as much as the host's clock does between the
/// two lines' arrival (within 250 ms of output latency), and by at least
/// the second slept. A loaded host stretches both alike, so the check holds
/// on a busy CI machine too.
#[test]
fn guest_time_follows_host_time() {
    let mut child = common::guest(
        "echo T0 $(cat /proc/uptime); sleep 1; echo T1 $(cat /proc/uptime)",
        "reboot",
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("spawn vessel");
    let _watchdog = Watchdog::new(&child);
    let reader = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut t0, mut t1) = (None, None);
    let uptime = |rest: &str| -> f64 {
        let first = rest.split_whitespace().next().unwrap_or_default();
        first.parse().unwrap_or_else(|_| panic!("no uptime in {rest:?}"))
    };
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("T0 ") {
            t0 = Some((Instant::now(), uptime(rest)));
        } else if let Some(rest) = line.strip_prefix("T1 ") {
            t1 = Some((Instant::now(), uptime(rest)));
        }
    }
    let status = child.wait().expect("wait");
    assert!(status.success());
    let ((host0, guest0), (host1, guest1)) = (t0.expect("T0"), t1.expect("T1"));
    let host = (host1 - host0).as_secs_f64();
    let guest = guest1 - guest0;
    assert!(guest >= 0.99, "the guest's uptime advanced {guest:.2} s across sleep 1");
    assert!(
        (host - guest).abs() < 0.25,
        "across sleep 1 the guest's uptime advanced {guest:.2} s and the host's clock {host:.2} s"
    );
}

#[test]
fn debian_stock_kernel_reaches_init() {
    let o = boot("debian/vmlinux", 1, "512M", "echo debian=$(uname -r)", "reboot");
    assert_clean_run(&o);
    assert!(stdout(&o).contains("debian=6.1"), "{}", stdout(&o));
}

/// Debian's kernel has ACPI: it finds our tables, takes the CPUs from the
/// MADT, and powers off through the FADT's sleep control register.
#[test]
fn debian_stock_kernel_uses_acpi_and_powers_off() {
    let o = boot(
        "debian/vmlinux",
        2,
        "512M",
        "dmesg | grep -E 'ACPI|smp|rtc'; grep -c ^processor /proc/cpuinfo",
        "poweroff",
    );
    assert_clean_run(&o);
    let s = stdout(&o);
    for want in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "smp: Brought up 1 node, 2 CPUs",
        "ACPI: PM: (supports S0 S5)",
        "rtc_cmos 00:01: registered as rtc0",
        "reboot: Power down",
    ] {
        assert!(s.contains(want), "no {want:?} in:\n{s}");
    }
    assert!(s.lines().any(|l| l.trim() == "2"), "expected 2 CPUs:\n{s}");
}

/// Debian's stock kernel with its own kind of initramfs: it loads Debian's
/// virtio and ext4 modules, virtio_mmio binds the devices that ACPI
/// describes (LNRO0005), and the guest switches to an ext4 root on a
/// read-only virtio-blk disk, where it reaches a shell and runs the command.
/// virtio-rng and virtio-console bind through ACPI too.
#[test]
fn debian_stock_kernel_boots_from_ext4_root_on_virtio_blk() {
    let root = artifact("debian/root.ext4");
    let dir = std::env::temp_dir().join(format!("vessel-debian-hvc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hvc = dir.join("hvc0.log");
    let o = vessel()
        .args(["run", "--accel", "emu", "--mem", "512M"])
        .arg("--kernel")
        .arg(artifact("debian/vmlinux"))
        .arg("--initrd")
        .arg(artifact("debian/initramfs.cpio.gz"))
        .arg("--disk")
        .arg(format!("path={},readonly=on", root.display()))
        .arg("--rng")
        .arg("--console-output")
        .arg(&hvc)
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 root=/dev/vda ro vessel.end=poweroff vessel.cmd={}",
            b64("cat /etc/vessel-root; grep ' / ' /proc/mounts; cat /sys/block/vda/ro; \
                 cat /sys/class/misc/hw_random/rng_current; \
                 ls /sys/bus/platform/drivers/virtio-mmio; echo sum=$((40+2)); \
                 echo debian-hvc-$((6*7)) > /dev/hvc0")
        ))
        .stdin(Stdio::null())
        .timed_output()
        .expect("run vessel");
    assert_clean_run(&o);
    let s = stdout(&o);
    for want in [
        "vessel debian root",
        "/dev/vda / ext4 ro",
        "virtio_rng.0",
        "LNRO0005:00",
        "LNRO0005:01",
        "LNRO0005:02",
        "sum=42",
        "reboot: Power down",
    ] {
        assert!(s.contains(want), "no {want:?} in:\n{s}");
    }
    assert!(!s.contains("vessel-initramfs:"), "the initramfs complained:\n{s}");
    let text = std::fs::read_to_string(&hvc).unwrap_or_default();
    std::fs::remove_dir_all(&dir).ok();
    assert!(text.contains("debian-hvc-42"), "virtio-console output: {text:?}");
}

/// Without `reboot=k`, Debian's kernel on hardware-reduced ACPI reboots
/// through EFI (absent) and then the BIOS reset vector, where Vessel's stub
/// resets the machine through the i8042.
#[test]
fn debian_stock_kernel_reboots_without_reboot_k() {
    let o = vessel()
        .args(["run", "--accel", "emu", "--mem", "512M"])
        .arg("--kernel")
        .arg(artifact("debian/vmlinux"))
        .arg("--initrd")
        .arg(artifact("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 panic=-1 vessel.end=reboot vessel.cmd={}",
            b64("echo x=$((3*3))")
        ))
        .stdin(Stdio::null())
        .timed_output()
        .expect("run vessel");
    assert_clean_run(&o);
    let s = stdout(&o);
    assert!(s.contains("x=9") && s.contains("reboot: machine restart"), "{s}");
}

fn one_error_line(o: &Output) -> String {
    assert!(!o.status.success());
    // The engine Vessel chose is named once on stderr when the VM starts;
    // the error itself is one line.
    let e: String = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| !l.starts_with("engine: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(e.lines().count(), 1, "expected one line, got: {e}");
    assert!(e.starts_with("error: "), "{e}");
    e
}

#[test]
fn user_errors_are_one_line() {
    let k = artifact("kernel/vmlinux");
    let run = |args: &[&str]| {
        vessel()
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .timed_output()
            .unwrap()
    };
    let e = one_error_line(&run(&["--kernel", "/nonexistent/kernel"]));
    assert!(e.contains("/nonexistent/kernel"));
    let e = one_error_line(&run(&["--kernel", k.to_str().unwrap(), "--mem", "1M"]));
    assert!(e.contains("memory"));
    let e = one_error_line(&run(&["--kernel", k.to_str().unwrap(), "--cpus", "0"]));
    assert!(e.contains("cpus"));
    let e = one_error_line(&run(&["--kernel", k.to_str().unwrap(), "--mem", "64G"]));
    assert!(e.contains("memory"), "{e}");

    let dir = std::env::temp_dir().join(format!("vessel-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, vec![0x42u8; 100_000]).unwrap();
    let e = one_error_line(&run(&["--kernel", garbage.to_str().unwrap()]));
    assert!(e.contains("neither an ELF"), "{e}");
    let big = dir.join("big-initrd");
    std::fs::write(&big, vec![0u8; 40 << 20]).unwrap();
    let e = one_error_line(&run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--mem",
        "48M",
        "--initrd",
        big.to_str().unwrap(),
    ]));
    assert!(e.contains("does not fit"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A kernel whose first instruction faults with no IDT: the vCPU triple
/// faults, Vessel prints its registers on one line and exits non-zero.
#[test]
fn triple_fault_reports_registers() {
    let dir = std::env::temp_dir().join(format!("vessel-triple-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = dir.join("ud2.elf");
    std::fs::write(&k, tiny_elf(&[0x0f, 0x0b])).unwrap();
    let o = vessel()
        .args(["run", "--kernel", k.to_str().unwrap()])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    let e = one_error_line(&o);
    assert!(
        e.contains("triple fault") && e.contains("rip=0x0000000001000000"),
        "{e}"
    );
    assert_eq!(o.status.code(), Some(4));
    std::fs::remove_dir_all(&dir).ok();
}

/// The ACPI power registers end the VM: S5 in the sleep control register
/// (power-off) and the reset value in the reset register. The code spins
/// afterwards, so only the register write can end the run.
#[test]
fn acpi_power_registers_end_the_vm() {
    let dir = std::env::temp_dir().join(format!("vessel-acpi-pm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // mov al, VALUE; mov dx, PORT; out dx, al; jmp $
    let code = |value: u8, port: u16| {
        let p = port.to_le_bytes();
        vec![0xb0, value, 0x66, 0xba, p[0], p[1], 0xee, 0xeb, 0xfe]
    };
    for (name, value, port) in [("poweroff", (5 << 2) | (1 << 5), 0x600), ("reset", 1, 0x602)] {
        let k = dir.join(format!("{name}.elf"));
        std::fs::write(&k, tiny_elf(&code(value, port))).unwrap();
        let mut child = vessel()
            .args(["run", "--kernel", k.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("{name}: the VM did not end");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{name}: {status:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A minimal ELF64 executable with one PT_LOAD segment at 16 MiB.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let entry: u64 = 0x100_0000;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&56u16.to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    let off = 0x1000u64;
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&off.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.resize(off as usize, 0);
    f.extend_from_slice(code);
    f
}
