//! A clean stop: `VmHandle::quit` while the guest keeps its disk busy;
//! when `Machine::run` returns, no device worker is left and everything
//! the guest wrote is in the image.

mod common;

use std::time::Duration;

use common::{guest_config, tail, Guest, Scratch};
use vmm::machine::{DiskConfig, RunOutcome};

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn quit_stops_every_worker_and_keeps_the_data() {
    let dir = Scratch::new("stop");
    let image = dir.blank("disk.img", 16 << 20);
    // Direct writes of a known block, then a loop that keeps the disk busy
    // until the host stops the machine.
    let cmd = "printf 'vessel-clean-stop-%04d\\n' $(seq 1 100) > /tmp/b && \
               dd if=/tmp/b of=/dev/vda bs=4k count=1 conv=sync oflag=direct 2>/dev/null && echo WROTE && \
               while :; do dd if=/dev/vda of=/dev/null bs=64k count=64 iflag=direct 2>/dev/null; done";
    let mut cfg = guest_config(cmd, "reboot");
    cfg.disks.push(DiskConfig {
        path: image.clone(),
        read_only: false,
        allow_absolute_backing: false,
        format: None,
    });
    let guest = Guest::boot(cfg, None);
    guest.wait_for("WROTE");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        thread_names().iter().any(|n| n == "virtio-blk"),
        "no virtio-blk worker while the guest runs: {:?}",
        thread_names()
    );
    let log = guest.console.clone();
    // A handle outlives the run (as the API server's does), so the
    // machine's devices are still alive when `run` returns: the workers
    // must have ended anyway.
    let vm = guest.vm.clone();
    vm.quit();
    let outcome = guest.finish(Duration::from_secs(20));
    assert_eq!(outcome, RunOutcome::Reset, "{}", tail(&log.text()));
    let left: Vec<String> = thread_names()
        .into_iter()
        .filter(|n| n.starts_with("virtio-") || n.starts_with("vcpu"))
        .collect();
    assert!(left.is_empty(), "threads left after run returned: {left:?}");
    let data = std::fs::read(&image).unwrap();
    let want: String = (1..=100).map(|i| format!("vessel-clean-stop-{i:04}\n")).collect();
    assert_eq!(&data[..want.len()], want.as_bytes());
    drop(vm);
}
