//! Boot time, side by side: wall time from process start to the guest's
//! marker line (`VESSEL-GUEST-READY`, printed by the initramfs's /init),
//! for Vessel (engine emu as it runs by default, with the JIT, and with
//! `--jit off`, the interpreter only) and for QEMU (TCG, microvm) on the
//! same kernel and initramfs, runs alternating, in one invocation. The
//! `RATIO boot` line is Vessel's default against QEMU. When
//! `VESSEL_BENCH_ARGS` already picks a JIT mode (scripts/bench-emu --jit),
//! only that mode runs.
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
    let mode_given = std::env::var("VESSEL_BENCH_ARGS").is_ok_and(|a| a.contains("--jit"));
    let vessel_cmd = |interpreter: bool| {
        let mut c = vessel_guest(&kernel, "console=ttyS0 reboot=k");
        if interpreter {
            c.args(["--jit", "off"]);
        }
        c
    };
    let qemu_cmd = || qemu_guest(&kernel, "console=ttyS0 reboot=t");
    let (mut v, mut i, mut q) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let tv = time_to_marker(vessel_cmd(false)).expect("Vessel did not reach the marker");
        let ti =
            (!mode_given).then(|| time_to_marker(vessel_cmd(true)).expect("Vessel --jit off did not reach the marker"));
        let tq = time_to_marker(qemu_cmd()).expect("QEMU did not reach the marker");
        println!(
            "run {}: vessel {:.3} s{}, qemu {:.3} s",
            run + 1,
            tv.as_secs_f64(),
            ti.map(|t| format!(", vessel --jit off {:.3} s", t.as_secs_f64()))
                .unwrap_or_default(),
            tq.as_secs_f64()
        );
        v.push(tv);
        i.extend(ti);
        q.push(tq);
    }
    let (mv, mq) = (median(&mut v), median(&mut q));
    println!("kernel: {}", kernel.display());
    println!(
        "median boot to marker: vessel (emu) {:.3} s, qemu (tcg, microvm) {:.3} s; ratio vessel/qemu {:.2}",
        mv.as_secs_f64(),
        mq.as_secs_f64(),
        mv.as_secs_f64() / mq.as_secs_f64(),
    );
    if !i.is_empty() {
        let mi = median(&mut i);
        println!(
            "median boot to marker, vessel --jit off (interpreter only): {:.3} s; ratio {:.2}",
            mi.as_secs_f64(),
            mi.as_secs_f64() / mq.as_secs_f64()
        );
    }
    println!("RATIO boot {:.2}", mv.as_secs_f64() / mq.as_secs_f64());
}
