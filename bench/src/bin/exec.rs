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

/// CPU time (user + system) of the waited-for children so far, in seconds.
fn children_cpu() -> f64 {
    // SAFETY: rusage is plain data that getrusage fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage for the call.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Run `cmd` to its end; its wall time and the CPU time it and its
/// children used, in seconds. It must succeed.
fn time_run(mut cmd: Command, what: &str) -> (f64, f64) {
    let cpu = children_cpu();
    let start = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let t = start.elapsed().as_secs_f64();
    assert!(status.success(), "{what} failed: {status}");
    (t, children_cpu() - cpu)
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
    let (first, _) = time_run(vessel_exec(false), "the first warm vessel exec");
    println!("first warm exec (takes the snapshot if missing): {first:.3} s");
    let (mut warm, mut cold, mut q) = (Vec::new(), Vec::new(), Vec::new());
    let (mut warm_cpu, mut cold_cpu, mut q_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let (w, wc) = time_run(vessel_exec(false), "vessel exec (warm)");
        let (c, cc) = time_run(vessel_exec(true), "vessel exec --cold");
        let (t, tc) = time_run(qemu(), "qemu");
        println!(
            "run {}: vessel exec warm {w:.3} s ({wc:.3} s CPU), cold {c:.3} s ({cc:.3} s CPU), \
             qemu boot+true {t:.3} s ({tc:.3} s CPU)",
            i + 1
        );
        warm.push(w);
        cold.push(c);
        q.push(t);
        warm_cpu.push(wc);
        cold_cpu.push(cc);
        q_cpu.push(tc);
    }
    println!(
        "median CPU time (user + system): warm {:.3} s, cold {:.3} s, qemu {:.3} s",
        median(&mut warm_cpu),
        median(&mut cold_cpu),
        median(&mut q_cpu)
    );
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
