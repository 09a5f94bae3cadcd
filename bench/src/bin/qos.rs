//! QoS isolation, side by side (issue 14, seed 003): how much a noisy
//! neighbour slows a VM's CPU work, with and without a CPU quota on the
//! neighbour's cgroup.
//!
//! The measured VM is Vessel (emu, one vCPU) running a shell CPU loop whose
//! sum the host checks; the time from its START to its SUM line is taken
//! from its console. The neighbour spins both its vCPUs. It is either
//! Vessel (emu) or the reference, QEMU (TCG, microvm), on the same guest,
//! and either unlimited or in a cgroup whose quota is one core
//! (`cpu.max` on a cgroup v2 host with the cpu controller, else v1
//! `cpu.cfs_quota_us`, as on this host). The slowdown is relative to the
//! loop with no neighbour, in the same run.
//!
//! Usage: cargo run --release -p vessel-bench --bin qos -- [RUNS] [LOOP]
//! (as root, after `cargo build --release -p vessel` and
//! `guest/build-all.sh`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use vessel_bench::{b64, default_kernel, median, qemu_guest, vessel_guest};

struct Running {
    child: Child,
    lines: Receiver<(Instant, String)>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(mut cmd: Command) -> Running {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a VM");
    let out = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), l)).is_err() {
                return;
            }
        }
    });
    Running { child, lines }
}

impl Running {
    /// When a line containing `marker` came, and the line.
    fn wait_for(&self, marker: &str) -> (Instant, String) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(600)) {
                Ok((at, l)) if l.contains(marker) => return (at, l),
                Ok(_) => {}
                Err(_) => panic!("no {marker:?} from the VM"),
            }
        }
    }
}

fn cpu_sum(n: u64) -> u64 {
    let mut s = 1u64;
    for i in 0..n {
        s = (s * 31 + i) % 1_000_003;
    }
    s
}

/// The measured VM's loop, in seconds of wall time.
fn measured_loop(iterations: u64) -> f64 {
    let cmd = format!(
        "echo START; s=1; i=0; while [ $i -lt {iterations} ]; do s=$(( (s*31 + i) % 1000003 )); i=$((i+1)); done; \
         echo SUM=$s; sleep 1000"
    );
    let vm = start(vessel_guest(
        &default_kernel(),
        &format!("console=ttyS0 reboot=k panic=-1 vessel.cmd={}", b64(&cmd)),
    ));
    let (t0, _) = vm.wait_for("START");
    let (t1, line) = vm.wait_for("SUM=");
    assert_eq!(line.trim(), format!("SUM={}", cpu_sum(iterations)), "wrong checksum");
    (t1 - t0).as_secs_f64()
}

#[derive(Clone, Copy, Debug)]
enum Neighbour {
    Vessel,
    Qemu,
}

const SPIN: &str = "(while :; do :; done) & echo SPINNING; while :; do :; done";

fn spinner(kind: Neighbour) -> Running {
    let kernel = default_kernel();
    let mut cmd = match kind {
        Neighbour::Vessel => vessel_guest(
            &kernel,
            &format!("console=ttyS0 reboot=k panic=-1 vessel.cmd={}", b64(SPIN)),
        ),
        Neighbour::Qemu => qemu_guest(
            &kernel,
            &format!("console=ttyS0 reboot=t panic=-1 vessel.cmd={}", b64(SPIN)),
        ),
    };
    match kind {
        Neighbour::Vessel => cmd.args(["--cpus", "2"]),
        Neighbour::Qemu => cmd.args(["-smp", "2"]),
    };
    let vm = start(cmd);
    vm.wait_for("SPINNING");
    vm
}

/// A cgroup with a CPU quota of one core, removed when dropped.
struct Quota {
    dir: PathBuf,
}

impl Quota {
    fn one_core(name: &str) -> Quota {
        let v2 = PathBuf::from("/sys/fs/cgroup");
        let v2_has_cpu = std::fs::read_to_string(v2.join("cgroup.controllers")).is_ok_and(|c| c.contains("cpu"));
        let (dir, file, value) = if v2_has_cpu {
            (v2.join(name), "cpu.max", "100000 100000")
        } else {
            (
                PathBuf::from("/sys/fs/cgroup/cpu").join(name),
                "cpu.cfs_quota_us",
                "100000",
            )
        };
        let _ = std::fs::create_dir(&dir);
        std::fs::write(dir.join(file), value)
            .unwrap_or_else(|e| panic!("{}: {e} (run as root)", dir.join(file).display()));
        Quota { dir }
    }

    fn admit(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("move the neighbour into the cgroup");
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let iterations: u64 = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(60_000);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("QoS: measured VM = Vessel emu, 1 vCPU, {iterations}-iteration shell loop; neighbour spins 2 vCPUs; {cores} host cores; {runs} runs, medians");
    let mut alone = Vec::new();
    let mut results: Vec<(Neighbour, bool, Vec<f64>)> = Vec::new();
    for kind in [Neighbour::Vessel, Neighbour::Qemu] {
        for limited in [false, true] {
            results.push((kind, limited, Vec::new()));
        }
    }
    for run in 0..runs {
        alone.push(measured_loop(iterations));
        for (kind, limited, times) in results.iter_mut() {
            let quota = limited.then(|| Quota::one_core(&format!("vessel-qos-bench-{}", std::process::id())));
            let neighbour = spinner(*kind);
            if let Some(q) = &quota {
                q.admit(neighbour.child.id());
            }
            std::thread::sleep(Duration::from_millis(500));
            times.push(measured_loop(iterations));
            drop(neighbour);
        }
        eprintln!("run {} done", run + 1);
    }
    let base = median(&mut alone);
    println!("| neighbour | neighbour's quota | loop time (s) | slowdown |");
    println!("|---|---|---|---|");
    println!("| none | - | {base:.2} | 1.00 |");
    for (kind, limited, mut times) in results {
        let t = median(&mut times);
        let quota = if limited { "1 core" } else { "none" };
        println!("| {kind:?} (2 vCPUs spinning) | {quota} | {t:.2} | {:.2} |", t / base);
    }
}
