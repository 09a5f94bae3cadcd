//! Snapshot create and restore, side by side with QEMU in the same run, at
//! two memory sizes, on the same guest (a ticker printing every 100 ms):
//!   - create: Vessel's `PUT /snapshot/create` on the paused VM, against
//!     QEMU's `migrate "exec:cat > FILE"` on the stopped VM (until
//!     `query-migrate` says completed); and the files' sizes on disk;
//!   - restore: from process start to the guest's next tick on the console:
//!     Vessel's `vessel run --api-sock` + `PUT /snapshot/load` (resume),
//!     against QEMU's `-incoming "exec:cat FILE"`; and Vessel's load call
//!     alone (the VMM's restore).
//!
//! Usage: cargo run --release -p vessel-bench --bin snapshot -- [RUNS] [MiB...]
//! (default 3 runs at 256 and 2048 MiB; after `cargo build --release -p
//! vessel` and `guest/build-all.sh`). Engines: Vessel emu, QEMU TCG.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vessel::api::client;
use vessel_bench::{b64, cache, default_kernel, median, qemu_guest, qmp, qmp_cmd, vessel_binary};

const TICKER: &str = "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.1; done";

/// Lines of `child`'s stdout, with the time each arrived.
fn lines(child: &mut Child) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<(Instant, String)>, what: &str) -> Instant {
    loop {
        let (t, l) = rx.recv_timeout(Duration::from_secs(120)).expect("guest output");
        if l.contains(what) {
            return t;
        }
    }
}

fn api(sock: &Path, method: &str, path: &str, body: &str) {
    let r = client::request(sock, method, path, Some(body), Duration::from_secs(120)).expect("API");
    assert!(r.status < 300, "{method} {path}: {}", r.body);
}

fn wait_sock(sock: &Path) {
    let start = Instant::now();
    while !client::request(sock, "GET", "/", None, Duration::from_secs(1)).is_ok_and(|r| r.status == 200) {
        assert!(start.elapsed() < Duration::from_secs(10), "no API");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn disk_usage(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn spawn_vessel(sock: &Path) -> Child {
    Command::new(vessel_binary())
        .arg("run")
        .arg("--api-sock")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel")
}

/// (create ms, state+memory bytes on disk, restore-to-tick ms, load ms)
fn vessel_run(dir: &Path, mib: u64) -> (f64, u64, f64, f64) {
    let sock = dir.join("v.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = spawn_vessel(&sock);
    let out = lines(&mut child);
    wait_sock(&sock);
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 vessel.cmd={}", b64(TICKER));
    api(
        &sock,
        "PUT",
        "/boot-source",
        &serde_json::json!({"kernel_image_path": default_kernel(), "initrd_path": cache().join("initramfs.cpio.gz"), "boot_args": cmdline}).to_string(),
    );
    api(
        &sock,
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count": 1, "mem_size_mib": {mib}, "accel": "emu"}}"#),
    );
    api(&sock, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    wait_line(&out, "tick5");
    api(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = (dir.join("state"), dir.join("memory"));
    let t = Instant::now();
    api(
        &sock,
        "PUT",
        "/snapshot/create",
        &serde_json::json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem}).to_string(),
    );
    let create = t.elapsed().as_secs_f64() * 1e3;
    let size = disk_usage(&state) + disk_usage(&mem);
    let _ = child.kill();
    let _ = child.wait();

    let sock2 = dir.join("v2.sock");
    let _ = std::fs::remove_file(&sock2);
    let t0 = Instant::now();
    let mut child = spawn_vessel(&sock2);
    let out = lines(&mut child);
    wait_sock(&sock2);
    let t = Instant::now();
    api(
        &sock2,
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true}).to_string(),
    );
    let load = t.elapsed().as_secs_f64() * 1e3;
    let ticked = wait_line(&out, "tick");
    let _ = child.kill();
    let _ = child.wait();
    (create, size, (ticked - t0).as_secs_f64() * 1e3, load)
}

fn qemu_run(dir: &Path, mib: u64) -> (f64, u64, f64) {
    let sock = dir.join("q.sock");
    let file = dir.join("qemu.mig");
    let _ = std::fs::remove_file(&sock);
    let cmdline = format!("console=ttyS0 reboot=t panic=-1 vessel.cmd={}", b64(TICKER));
    let qemu = |extra: &[String]| {
        let mut c = qemu_guest(&default_kernel(), &cmdline);
        c.args(["-m", &format!("{mib}M")])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        c.spawn().expect("qemu-system-x86_64")
    };
    let mut child = qemu(&[]);
    let out = lines(&mut child);
    wait_line(&out, "tick5");
    let mut q = qmp(&sock);
    qmp_cmd(&mut q, r#"{"execute": "stop"}"#);
    let t = Instant::now();
    qmp_cmd(
        &mut q,
        &format!(
            r#"{{"execute": "migrate", "arguments": {{"uri": "exec:cat > {}"}}}}"#,
            file.display()
        ),
    );
    loop {
        let s = qmp_cmd(&mut q, r#"{"execute": "query-migrate"}"#).to_string();
        if s.contains("\"completed\"") {
            break;
        }
        assert!(!s.contains("\"failed\""), "QEMU migration failed: {s}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let create = t.elapsed().as_secs_f64() * 1e3;
    let size = disk_usage(&file);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let mut child = qemu(&["-incoming".into(), format!("exec:cat {}", file.display())]);
    let out = lines(&mut child);
    // An incoming VM that was stopped when saved stays stopped: continue it.
    let mut q = qmp(&sock);
    loop {
        let s = qmp_cmd(&mut q, r#"{"execute": "query-migrate"}"#).to_string();
        if s.contains("\"completed\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    qmp_cmd(&mut q, r#"{"execute": "cont"}"#);
    let ticked = wait_line(&out, "tick");
    let _ = child.kill();
    let _ = child.wait();
    (create, size, (ticked - t0).as_secs_f64() * 1e3)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let sizes: Vec<u64> = if args.len() > 1 {
        args[1..].iter().filter_map(|a| a.parse().ok()).collect()
    } else {
        vec![256, 2048]
    };
    let dir = std::env::temp_dir().join(format!("vessel-snap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    for mib in sizes {
        let (mut vc, mut vs, mut vr, mut vl, mut qc, mut qs, mut qr) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for i in 0..runs {
            let (c, s, r, l) = vessel_run(&dir, mib);
            let (c2, s2, r2) = qemu_run(&dir, mib);
            println!(
                "{mib} MiB run {}: vessel create {c:.0} ms ({} MiB), restore to tick {r:.0} ms (load {l:.1} ms); qemu save {c2:.0} ms ({} MiB), restore to tick {r2:.0} ms",
                i + 1,
                s >> 20,
                s2 >> 20
            );
            vc.push(c);
            vs.push(s as f64);
            vr.push(r);
            vl.push(l);
            qc.push(c2);
            qs.push(s2 as f64);
            qr.push(r2);
        }
        let (vc, vs, vr, vl) = (median(&mut vc), median(&mut vs), median(&mut vr), median(&mut vl));
        let (qc, qs, qr) = (median(&mut qc), median(&mut qs), median(&mut qr));
        println!(
            "{mib} MiB median: create vessel {vc:.0} ms / qemu {qc:.0} ms (ratio {:.2}); size vessel {:.0} MiB / qemu {:.0} MiB; restore to running vessel {vr:.0} ms / qemu {qr:.0} ms (ratio {:.2}); vessel load call {vl:.1} ms",
            vc / qc,
            vs / 1048576.0,
            qs / 1048576.0,
            vr / qr
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
