//! Seccomp under a real workload (emu engine): a guest on a TAP, with a
//! raw and a qcow2 disk, rng and virtio-console, driven over its API
//! (pause, resume, snapshot) and restored from the snapshot, runs with
//! every thread filtered (Seccomp: 2) and is never killed by a filter.
//! The filters' refusals are unit-tested in vmm::seccomp.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn cli(run_dir: &Path, args: &[&str]) {
    let o = runtime_cmd(run_dir)
        .args(args)
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(
        o.status.success(),
        "vessel {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).timed_output().expect("ip (iproute2)");
    assert!(
        o.status.success(),
        "ip {args:?}: {} (this test needs root: CAP_NET_ADMIN for the namespace and the tap)",
        String::from_utf8_lossy(&o.stderr)
    );
}

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).timed_output();
    }
}

fn wait_for(file: &Path, what: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        if start.elapsed() > timeout {
            let tail: Vec<_> = text.lines().rev().take(15).collect();
            let dir = file.parent().unwrap();
            let vmm_log = std::fs::read_to_string(dir.join("vmm.log"))
                .or_else(|_| std::fs::read_to_string(dir.parent().unwrap().join(".sc.vmm.log")))
                .unwrap_or_default();
            panic!(
                "no {what:?} in {}; its end:\n{}\nvmm.log: {vmm_log}",
                file.display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every thread of `pid` runs under a seccomp filter.
fn assert_all_threads_filtered(pid: &str) {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if status.is_empty() {
            continue; // the thread ended meanwhile
        }
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "thread {} of {pid} runs without a filter",
            comm.trim()
        );
        n += 1;
    }
    assert!(n >= 5, "only {n} threads");
}

#[test]
fn full_workload_and_snapshot_under_seccomp() {
    let s = Scratch::new("seccomp-e2e");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let ns = Ns(format!("vessel-sc-{}", std::process::id()));
    let _ = Command::new("ip").args(["netns", "del", &ns.0]).timed_output();
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "tuntap", "add", "vtap0", "mode", "tap"]);
    ip(&["-n", &ns.0, "addr", "add", "10.76.0.1/24", "dev", "vtap0"]);
    ip(&["-n", &ns.0, "link", "set", "vtap0", "up"]);
    let raw = s.blank("raw.img", 64 << 20);
    let qcow2 = s.0.join("disk.qcow2");
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg("64M")
        .timed_output()
        .expect("qemu-img");
    assert!(o.status.success());
    let hvc = s.0.join("hvc.log");
    let work = "ip addr add 10.76.0.2/24 dev eth0; ip link set eth0 up; ping -c 2 10.76.0.1 && echo PING-OK; \
        head -c 4096 /dev/hwrng | wc -c; echo second > /dev/hvc0; \
        dd if=/dev/urandom of=/dev/vda bs=64k count=16 oflag=direct; \
        dd if=/dev/urandom of=/dev/vdb bs=64k count=16 oflag=direct; \
        dd if=/dev/vdb of=/dev/null bs=64k count=16; sync; echo WORKLOAD-DONE; \
        i=0; while true; do i=$((i+1)); echo tick $i > /dev/hvc0; sleep 1; done";
    let o = Command::new("ip")
        .env("VESSEL_RUNTIME_DIR", &run_dir)
        .args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "--detach", "--name", "sc", "--accel", "emu", "--mem", "256M"])
        .arg("--kernel")
        .arg(artifact("kernel/vmlinux"))
        .arg("--initrd")
        .arg(artifact("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 vessel.end=reboot vessel.cmd={}",
            b64(work)
        ))
        .arg("--disk")
        .arg(format!("path={},format=raw", raw.display()))
        .arg("--disk")
        .arg(format!("path={}", qcow2.display()))
        .args(["--net", "tap=vtap0", "--rng", "--console-output"])
        .arg(&hvc)
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let vm = run_dir.join("sc");
    let log = wait_for(&vm.join("console.log"), "WORKLOAD-DONE", Duration::from_secs(120));
    assert!(log.contains("PING-OK"), "{log}");
    assert!(log.contains("4096"), "{log}");
    let pid = std::fs::read_to_string(vm.join("pid")).unwrap().trim().to_string();
    assert_all_threads_filtered(&pid);
    cli(&run_dir, &["pause", "sc"]);
    cli(&run_dir, &["resume", "sc"]);
    cli(&run_dir, &["inspect", "sc"]);
    let snap = s.0.join("snap");
    cli(&run_dir, &["snapshot", "sc", snap.to_str().unwrap()]);
    assert_all_threads_filtered(&pid);
    let vmm_log = std::fs::read_to_string(vm.join("vmm.log")).unwrap_or_default();
    assert!(!vmm_log.contains("seccomp"), "{vmm_log}");
    cli(&run_dir, &["stop", "sc", "--timeout", "10"]);

    // The clone goes on where the snapshot was: ticks on its console.
    let o = Command::new("ip")
        .env("VESSEL_RUNTIME_DIR", &run_dir)
        .args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args(["restore"])
        .arg(&snap)
        .args(["--name", "sc2"])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let vm2 = run_dir.join("sc2");
    let pid2 = std::fs::read_to_string(vm2.join("pid")).unwrap().trim().to_string();
    let before = std::fs::read_to_string(&hvc).unwrap_or_default().len();
    let start = Instant::now();
    while std::fs::read_to_string(&hvc).unwrap_or_default().len() <= before {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the restored guest wrote nothing to hvc0"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_all_threads_filtered(&pid2);
    cli(&run_dir, &["pause", "sc2"]);
    cli(&run_dir, &["resume", "sc2"]);
    let vmm_log = std::fs::read_to_string(vm2.join("vmm.log")).unwrap_or_default();
    assert!(!vmm_log.contains("seccomp"), "{vmm_log}");
    cli(&run_dir, &["stop", "sc2", "--timeout", "10"]);
}
