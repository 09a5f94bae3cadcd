//! `vessel exec -- true` from command to exit: warm (a clone of the cached
//! snapshot of the booted default guest) and cold (`--cold`, a boot), both
//! under emu, next to QEMU (TCG, microvm) booting the same kernel and
//! initramfs to run the same command (`vessel.cmd`, then a reboot that
//! `-no-reboot` turns into QEMU's exit). Runs alternate, in one invocation.
//!
//! Usage: cargo run --release -p vessel-bench --bin exec -- [RUNS]
//! (after `cargo build --release -p vessel` and `guest/build-all.sh`).
//! The first, untimed, warm exec takes the snapshot if there is none.

use std::process::{Command, Stdio};
use std::time::Instant;

use vessel_bench::{b64, default_kernel, median, qemu_guest, vessel_binary};

/// Run `cmd` to its end; its wall time in seconds. It must succeed.
fn time_run(mut cmd: Command, what: &str) -> f64 {
    let start = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let t = start.elapsed().as_secs_f64();
    assert!(status.success(), "{what} failed: {status}");
    t
}

fn vessel_exec(cold: bool) -> Command {
    let mut c = Command::new(vessel_binary());
    c.args(["exec", "--accel", "emu"]);
    if cold {
        c.arg("--cold");
    }
    c.args(["--", "true"]);
    c
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let kernel = default_kernel();
    let qemu = || {
        qemu_guest(
            &kernel,
            &format!(
                "console=ttyS0 reboot=t panic=-1 quiet vessel.end=reboot vessel.cmd={}",
                b64("true")
            ),
        )
    };
    let first = time_run(vessel_exec(false), "the first warm vessel exec");
    println!("first warm exec (takes the snapshot if missing): {first:.3} s");
    let (mut warm, mut cold, mut q) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let w = time_run(vessel_exec(false), "vessel exec (warm)");
        let c = time_run(vessel_exec(true), "vessel exec --cold");
        let t = time_run(qemu(), "qemu");
        println!(
            "run {}: vessel exec warm {w:.3} s, cold {c:.3} s, qemu boot+true {t:.3} s",
            i + 1
        );
        warm.push(w);
        cold.push(c);
        q.push(t);
    }
    let (mw, mc, mq) = (median(&mut warm), median(&mut cold), median(&mut q));
    println!("kernel: {}", kernel.display());
    println!(
        "median `true` from command to exit: vessel exec warm (emu) {mw:.3} s, cold (emu) {mc:.3} s, \
         qemu (tcg, microvm) boot {mq:.3} s; warm/qemu {:.3}, cold/qemu {:.2}, warm/cold {:.3}",
        mw / mq,
        mc / mq,
        mw / mc
    );
}
