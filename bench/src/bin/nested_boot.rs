//! Boot time under KVM, side by side, inside the nested-SVM environment
//! (guest/run-nested.sh: Debian's kernel under QEMU TCG `-cpu max`, with
//! kvm_amd loaded): `vessel run --accel kvm` against
//! `qemu-system-x86_64 -enable-kvm -M microvm`, the same minimal guest
//! (vmlinux + initramfs, /init runs `true` and the VM exits), runs
//! alternating, timed inside the nested guest from start to exit.
//!
//! Usage: cargo run --release -p vessel-bench --bin nested_boot -- [RUNS]
//! (after `WITH_DEBIAN_KERNEL=1 guest/build-all.sh`). It builds the nested
//! initramfs with QEMU inside (WITH_QEMU=1 guest/build-nested.sh).

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cache() -> PathBuf {
    std::env::var_os("VESSEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel"))
}

/// `true` for the guest's /init, as base64 (`dHJ1ZQo=` is "true\n").
const TRUE_B64: &str = "dHJ1ZQo=";

fn script(runs: u32) -> String {
    let vessel = format!(
        "/bin/vessel run --accel kvm --mem 256M --kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz \
         --cmdline 'console=ttyS0 reboot=k panic=-1 vessel.cmd={TRUE_B64}'"
    );
    let qemu = format!(
        "qemu-system-x86_64 -enable-kvm -cpu host -M microvm,x-option-roms=off,acpi=off -m 256M -nodefaults \
         -no-user-config -nographic -no-reboot -serial stdio -kernel /guest/vmlinux \
         -initrd /guest/initramfs.cpio.gz \
         -append 'console=ttyS0 reboot=t pci=off panic=-1 vessel.cmd={TRUE_B64} vessel.end=reboot'"
    );
    let mut s = String::from(
        "t() { a=$(cut -d' ' -f1 /proc/uptime); \"$@\" >/tmp/o 2>&1 </dev/null; rc=$?; \
         b=$(cut -d' ' -f1 /proc/uptime); m=$(grep -c VESSEL-CMD-EXIT=0 /tmp/o); echo \"$a $b $rc $m\"; }\n",
    );
    // One warm-up of each (page cache), then alternate.
    s.push_str(&format!(
        "{vessel} >/dev/null 2>&1 </dev/null; {qemu} >/dev/null 2>&1 </dev/null\n"
    ));
    for i in 0..runs {
        s.push_str(&format!("echo \"BENCH vessel {i} $(t {vessel})\"\n"));
        s.push_str(&format!("echo \"BENCH qemu {i} $(t {qemu})\"\n"));
    }
    s.push_str("tail -5 /tmp/o\n");
    s
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let build = Command::new(repo().join("guest/build-nested.sh"))
        .env("WITH_QEMU", "1")
        .status()
        .expect("guest/build-nested.sh");
    assert!(build.success(), "guest/build-nested.sh failed");
    let initrd = cache().join("nested/initramfs-qemu.cpio.gz");
    let out = Command::new(repo().join("guest/run-nested.sh"))
        .args(["-m", "2G", "-i"])
        .arg(&initrd)
        .arg("--")
        .arg(script(runs))
        .output()
        .expect("guest/run-nested.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut vessel, mut qemu) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| l.starts_with("BENCH ")) {
        println!("{line}");
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(a), Some(b)) = (
            f.get(3).and_then(|v| v.parse::<f64>().ok()),
            f.get(4).and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        if f.get(5) != Some(&"0") || f.get(6) != Some(&"1") {
            eprintln!("run failed: {line}");
            continue;
        }
        match f[1] {
            "vessel" => vessel.push(b - a),
            "qemu" => qemu.push(b - a),
            _ => {}
        }
    }
    if vessel.is_empty() || qemu.is_empty() {
        eprintln!("{text}");
        panic!("no complete runs");
    }
    let (v, q) = (median(&mut vessel), median(&mut qemu));
    println!(
        "nested KVM (QEMU TCG -cpu max, kvm_amd), boot to exit, median of {} / {} runs: \
         vessel --accel kvm {v:.2} s, qemu -enable-kvm -M microvm {q:.2} s, ratio vessel/qemu {:.2}",
        vessel.len(),
        qemu.len(),
        v / q
    );
}
