//! Boot time, side by side: wall time from process start to the guest's
//! marker line (`VESSEL-GUEST-READY`, printed by the initramfs's /init),
//! for Vessel (engine emu, interpreter only and with `--jit on`) and for
//! QEMU (TCG, microvm) on the same kernel and initramfs, runs alternating,
//! in one invocation.
//!
//! Usage: cargo run --release -p vessel-bench --bin boot -- [RUNS] [KERNEL]
//! (after `cargo build --release -p vessel` and `guest/build-all.sh`).
//! KERNEL defaults to the minimal guest's vmlinux in the cache.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vessel_bench::{default_kernel, qemu_guest, vessel_guest};

const MARKER: &str = "VESSEL-GUEST-READY";

/// Start `cmd`, return the time until its stdout shows the marker, then kill it.
fn time_to_marker(mut cmd: Command) -> Option<Duration> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let mut found = None;
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if line.contains(MARKER) {
            found = Some(start.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let kernel = std::env::args()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(default_kernel);
    // The guest's /init sees no command, so it would start a shell; we stop
    // each run at the marker anyway.
    let vessel_cmd = |jit: &str| {
        let mut c = vessel_guest(&kernel, "console=ttyS0 reboot=k");
        c.args(["--jit", jit]);
        c
    };
    let qemu_cmd = || qemu_guest(&kernel, "console=ttyS0 reboot=t");
    let (mut v, mut j, mut q) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let tv = time_to_marker(vessel_cmd("off")).expect("Vessel did not reach the marker");
        let tj = time_to_marker(vessel_cmd("on")).expect("Vessel --jit on did not reach the marker");
        let tq = time_to_marker(qemu_cmd()).expect("QEMU did not reach the marker");
        println!(
            "run {}: vessel {:.3} s, vessel --jit on {:.3} s, qemu {:.3} s",
            i + 1,
            tv.as_secs_f64(),
            tj.as_secs_f64(),
            tq.as_secs_f64()
        );
        v.push(tv);
        j.push(tj);
        q.push(tq);
    }
    let (mv, mj, mq) = (median(&mut v), median(&mut j), median(&mut q));
    println!("kernel: {}", kernel.display());
    println!(
        "median boot to marker: vessel (emu) {:.3} s, vessel (emu, --jit on) {:.3} s, qemu (tcg, microvm) {:.3} s; \
         ratio vessel/qemu {:.2}, jit/qemu {:.2}",
        mv.as_secs_f64(),
        mj.as_secs_f64(),
        mq.as_secs_f64(),
        mv.as_secs_f64() / mq.as_secs_f64(),
        mj.as_secs_f64() / mq.as_secs_f64()
    );
    println!("RATIO boot {:.2}", mv.as_secs_f64() / mq.as_secs_f64());
}
