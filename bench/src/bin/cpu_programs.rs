//! CPU-bound guest programs with checksums, side by side: `cpubench`
//! (guest/cpubench/cpubench.c: memcpy/memmove/memset, string functions, a
//! sieve, integer loops, double-precision sqrt and division, 128-bit
//! multiplies, and the guest-side `cpu_loop`) runs natively on the host
//! (the checksum reference), under Vessel (engine emu) and under QEMU (TCG,
//! microvm), with the same kernel and the bench initramfs, in one
//! invocation (Vessel and QEMU alternating when RUNS > 1).
//!
//! Each program's time is measured twice: on the host, between the console
//! lines the guest prints (the primary figure, independent of the guest's
//! clock), and by the guest's own CLOCK_MONOTONIC (printed alongside as a
//! cross-check). A checksum that differs from the native one is a wrong
//! result: the table says MISMATCH and the process exits with status 1.
//!
//! Usage: cargo run --release -p vessel-bench --bin cpu_programs -- [RUNS] [SCALE] [KERNEL]
//! (after `cargo build --release -p vessel`, `guest/build-all.sh` and
//! `guest/build-cpubench.sh`). KERNEL defaults to the minimal guest's
//! vmlinux. Prints `RATIO cpu/NAME X` lines (Vessel/QEMU time) for
//! scripts/bench-emu.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use vessel_bench::{b64, cache, default_kernel, median, qemu_guest_with, vessel_guest_with};

/// One program's result from one run.
#[derive(Clone, Debug)]
struct Outcome {
    checksum: String,
    /// Seconds between this line and the previous marker, on the host.
    host_s: f64,
    /// Seconds the guest's clock says the work took.
    guest_s: f64,
    mips: Option<f64>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Run `cmd` and collect the `CPUBENCH` lines its stdout shows, timing each
/// from the previous `CPUBENCH` line (or `CPUBENCH-GO`, or the start when
/// `go_at_start`). Errors when the output ends before `CPUBENCH-DONE`.
fn collect(mut cmd: Command, go_at_start: bool) -> Result<Vec<(String, Outcome)>, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let out = child.stdout.take().expect("piped stdout");
    let mut mark = go_at_start.then(Instant::now);
    let mut results = Vec::new();
    let mut done = false;
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        let t = line.trim();
        if t.contains("CPUBENCH-GO") {
            mark = Some(Instant::now());
        } else if t.contains("CPUBENCH-DONE") {
            done = true;
            break;
        } else if let Some(rest) = t.find("CPUBENCH name=").map(|i| &t[i..]) {
            let now = Instant::now();
            let host_s = mark.map(|m| (now - m).as_secs_f64()).unwrap_or(f64::NAN);
            mark = Some(now);
            let name = field(rest, "name").unwrap_or("?").to_string();
            let checksum = field(rest, "checksum").unwrap_or("?").to_string();
            let guest_s = field(rest, "ns")
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
                / 1e9;
            let mips = field(rest, "mips").and_then(|m| m.parse().ok());
            results.push((
                name,
                Outcome {
                    checksum,
                    host_s,
                    guest_s,
                    mips,
                },
            ));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    if done {
        Ok(results)
    } else {
        Err(format!(
            "{:?} ended before CPUBENCH-DONE ({} programs reported)",
            cmd.get_program(),
            results.len()
        ))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1).max(1);
    let scale: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1).max(1);
    let kernel = args.next().map(PathBuf::from).unwrap_or_else(default_kernel);
    let dir = cache().join("cpubench");
    let (bin, initrd) = (dir.join("cpubench"), dir.join("initramfs.cpio.gz"));
    for need in [&bin, &initrd, &kernel] {
        if !need.exists() {
            eprintln!(
                "error: missing {}: run guest/build-all.sh and guest/build-cpubench.sh",
                need.display()
            );
            std::process::exit(2);
        }
    }
    let guest_cmd = b64(&format!("echo CPUBENCH-GO; /bin/cpubench {scale}\n"));
    let cmdline =
        |reboot: &str| format!("console=ttyS0 reboot={reboot} panic=-1 vessel.end=reboot vessel.cmd={guest_cmd}");
    let vessel = || vessel_guest_with(&kernel, &initrd, &cmdline("k"));
    let qemu = || qemu_guest_with(&kernel, &initrd, &cmdline("t"));
    let native = || {
        let mut c = Command::new(&bin);
        c.arg(scale.to_string());
        c
    };

    let unwrap = |who: &str, r: Result<Vec<(String, Outcome)>, String>| {
        r.unwrap_or_else(|e| {
            eprintln!("error: {who}: {e}");
            std::process::exit(1)
        })
    };
    // The native reference: its checksums are the right answers.
    let reference = unwrap("native", collect(native(), true));
    let order: Vec<String> = reference.iter().map(|(n, _)| n.clone()).collect();
    let mut results: BTreeMap<(String, &str), Vec<Outcome>> = BTreeMap::new();
    for (name, o) in &reference {
        results.entry((name.clone(), "native")).or_default().push(o.clone());
    }
    for run in 1..=runs {
        for (who, cmd) in [("vessel", vessel()), ("qemu", qemu())] {
            let start = Instant::now();
            let got = unwrap(who, collect(cmd, false));
            println!(
                "run {run}: {who} done in {:.1} s: {}",
                start.elapsed().as_secs_f64(),
                got.iter()
                    .map(|(n, o)| format!("{n} {:.2}s", o.host_s))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (name, o) in got {
                results.entry((name, who)).or_default().push(o);
            }
        }
    }

    let mut bad = false;
    println!(
        "\nkernel {}, scale {scale}, medians of {runs} run(s); times in seconds, on the host (guest clock in brackets)",
        kernel.display()
    );
    println!("| program | checksum (native) | native | Vessel emu | QEMU TCG | Vessel/QEMU | Vessel/QEMU guest clock | Vessel/native |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut mips_row = Vec::new();
    for name in &order {
        let want = &results[&(name.clone(), "native")][0];
        let mut row = Vec::new();
        for who in ["vessel", "qemu"] {
            let os = results.get(&(name.clone(), who)).cloned().unwrap_or_default();
            if os.len() != runs || os.iter().any(|o| o.checksum != want.checksum) {
                bad = true;
                let got: Vec<&str> = os.iter().map(|o| o.checksum.as_str()).collect();
                println!(
                    "MISMATCH {name} under {who}: checksums {got:?}, native {}",
                    want.checksum
                );
            }
            let host = median(&mut os.iter().map(|o| o.host_s).collect::<Vec<_>>());
            let guest = median(&mut os.iter().map(|o| o.guest_s).collect::<Vec<_>>());
            if let Some(m) = os.iter().filter_map(|o| o.mips).map(Some).collect::<Option<Vec<f64>>>() {
                if !m.is_empty() {
                    mips_row.push((who, median(&mut m.clone())));
                }
            }
            row.push((host, guest));
        }
        let ((vh, vg), (qh, qg)) = (row[0], row[1]);
        println!(
            "| {name} | {} | {:.3} | {vh:.2} [{vg:.2}] | {qh:.2} [{qg:.2}] | {:.1} | {:.1} | {:.0} |",
            want.checksum,
            want.guest_s,
            vh / qh,
            vg / qg,
            vh / want.guest_s
        );
        println!("RATIO cpu/{name} {:.2}", vh / qh);
    }
    if let Some(native_mips) = results.get(&("cpu_loop".to_string(), "native")).and_then(|o| o[0].mips) {
        let get = |who: &str| {
            mips_row
                .iter()
                .find(|(w, _)| *w == who)
                .map(|(_, m)| *m)
                .unwrap_or(f64::NAN)
        };
        println!(
            "\ncpu_loop in the guest (add/dec/jnz, guest clock): Vessel emu {:.0} MIPS, QEMU TCG {:.0} MIPS, native {:.0} MIPS",
            get("vessel"),
            get("qemu"),
            native_mips
        );
        println!("RATIO cpu_loop_mips(qemu/vessel) {:.2}", get("qemu") / get("vessel"));
    }
    if bad {
        eprintln!("error: a checksum under a VMM differs from the native result");
        std::process::exit(1);
    }
}
