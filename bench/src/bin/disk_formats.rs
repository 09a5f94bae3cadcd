//! qcow2 against raw, Vessel against QEMU: the minimal guest runs
//! sequential (1 MiB) and random (4 KiB) direct I/O on a virtio-blk disk
//! with `randio` (guest/tools/randio.c, on the test disk), for each of
//! {raw, qcow2} x {Vessel (emu), QEMU (TCG, microvm)}, alternating, in one
//! invocation. Each boot gets a fresh image: a sparse raw file, or a qcow2
//! made by `vessel disk create`.
//!
//! Usage: cargo run --release -p vessel-bench --bin disk_formats -- [RUNS]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use vessel_bench::{b64, cache, default_kernel, median, qemu_disk, qemu_guest, vessel_binary, vessel_guest};

const SPAN_MIB: u64 = 128;
const RANDOM_OPS: u64 = 2000;
const PHASES: [&str; 4] = ["seqwrite", "seqread", "randwrite", "randread"];

fn fresh_image(path: &Path, format: &str) {
    let _ = std::fs::remove_file(path);
    let size = (SPAN_MIB + 16) << 20;
    if format == "raw" {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(size))
            .expect("raw image");
    } else {
        let ok = Command::new(vessel_binary())
            .args(["disk", "create"])
            .arg(path)
            .args(["--size", &format!("{}M", size >> 20)])
            .stdout(Stdio::null())
            .status()
            .expect("vessel disk create")
            .success();
        assert!(ok, "vessel disk create failed");
    }
}

/// Boot, run the four phases, return MB/s per phase.
fn run(mut cmd: Command) -> BTreeMap<String, f64> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("start the VMM");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("RANDIO ")) {
        let mut f = line.split_whitespace();
        let phase = f.nth(1).unwrap_or("").to_string();
        let mbps = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("MBps="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        r.insert(phase, mbps);
    }
    assert_eq!(
        r.len(),
        PHASES.len(),
        "the guest did not finish its phases under {cmd:?} ({}):\n{text}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    r
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let tools = cache().join("disk.ext4");
    let image = std::env::temp_dir().join(format!("vessel-bench-formats-{}", std::process::id()));
    // The tools disk is found by its label, whatever order the VMM gives disks.
    let script = format!(
        "mkdir -p /t && mount -o ro $(findfs LABEL=vessel) /t && \
         for d in /dev/vda /dev/vdb; do grep -q \"^$d \" /proc/mounts || D=$d; done; \
         /t/tools/randio $D seqwrite 1048576 {SPAN_MIB} {SPAN_MIB} && \
         /t/tools/randio $D seqread 1048576 {SPAN_MIB} {SPAN_MIB} && \
         /t/tools/randio $D randwrite 4096 {SPAN_MIB} {RANDOM_OPS} && \
         /t/tools/randio $D randread 4096 {SPAN_MIB} {RANDOM_OPS}"
    );
    let cmdline = |reboot: &str| format!("console=ttyS0 reboot={reboot} vessel.cmd={}", b64(&script));
    let mut results: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    for i in 0..runs {
        for format in ["raw", "qcow2"] {
            for vmm in ["vessel", "qemu"] {
                fresh_image(&image, format);
                let cmd = if vmm == "vessel" {
                    let mut c = vessel_guest(&default_kernel(), &cmdline("k"));
                    // The format is named, as Vessel never guesses it from the
                    // image's bytes.
                    c.arg("--disk").arg(format!("path={},format={format}", image.display()));
                    c.arg("--disk").arg(format!("path={},readonly=on", tools.display()));
                    c
                } else {
                    let mut c = qemu_guest(&default_kernel(), &cmdline("t"));
                    qemu_disk(&mut c, "d0", &image, format, false);
                    qemu_disk(&mut c, "d1", &tools, "raw", true);
                    c
                };
                let r = run(cmd);
                print!("run {} {format:5} {vmm:6}", i + 1);
                for p in PHASES {
                    print!(" {p} {:7.1}", r[p]);
                    results
                        .entry((format.to_string(), vmm.to_string(), p.to_string()))
                        .or_default()
                        .push(r[p]);
                }
                println!(" MB/s");
            }
        }
    }
    let _ = std::fs::remove_file(&image);
    let mut m = |f: &str, v: &str, p: &str| median(results.get_mut(&(f.into(), v.into(), p.into())).expect("result"));
    println!("\nmedians of {runs} runs, MB/s (4 KiB random: {RANDOM_OPS} ops over {SPAN_MIB} MiB):");
    println!("| phase | Vessel raw | Vessel qcow2 | qcow2/raw | QEMU raw | QEMU qcow2 | qcow2/raw | Vessel/QEMU raw | Vessel/QEMU qcow2 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for p in PHASES {
        let (vr, vq, qr, qq) = (
            m("raw", "vessel", p),
            m("qcow2", "vessel", p),
            m("raw", "qemu", p),
            m("qcow2", "qemu", p),
        );
        println!(
            "| {p} | {vr:.1} | {vq:.1} | {:.2} | {qr:.1} | {qq:.1} | {:.2} | {:.2} | {:.2} |",
            vq / vr,
            qq / qr,
            vr / qr,
            vq / qq
        );
    }
    // Time per byte, Vessel over QEMU (below 1.0 means Vessel is faster),
    // for scripts/bench-emu.
    for p in PHASES {
        println!("RATIO disk/{p}-raw {:.2}", m("raw", "qemu", p) / m("raw", "vessel", p));
    }
}
