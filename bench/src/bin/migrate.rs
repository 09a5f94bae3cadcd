//! Live migration over TCP on this host, side by side with QEMU in the
//! same run, on the same guest with the same memory (256 MiB), at the
//! default downtime limit (300 ms):
//!   - idle: a ticker printing every 100 ms;
//!   - dirtying: the guest rewrites 1 MiB of non-zero data every 100 ms.
//!
//! Vessel: `vessel run --api-sock` (source, emu) and `PUT /migration/receive
//! tcp:` on a fresh Vessel, then `PUT /migration/send`; the figures are the
//! source's `GET /migration` (total time, bytes) and the destination's
//! (downtime). QEMU (TCG): `-incoming tcp:` and `migrate tcp:`, figures
//! from the source's `query-migrate`.
//!
//! Usage: cargo run --release -p vessel-bench --bin migrate -- [RUNS]
//! (after `cargo build --release -p vessel` and `guest/build-all.sh`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vessel::api::client;
use vessel_bench::{b64, default_kernel, median, qemu_guest, qmp, qmp_cmd, vessel_binary, vessel_guest};

const IDLE: &str = "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.1; done";
const DIRTY: &str =
    "i=0; while true; do yes dirty$i | head -c 1048576 > /tmp/d; echo tick$i; i=$((i+1)); sleep 0.1; done";

fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, what: &str) {
    loop {
        let l = rx.recv_timeout(Duration::from_secs(180)).expect("guest output");
        if l.contains(what) {
            return;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(sock: &Path, path: &str) -> Option<serde_json::Value> {
    client::request(sock, "GET", path, None, Duration::from_secs(5))
        .ok()
        .map(|r| r.json())
}

fn put(sock: &Path, path: &str, body: &str) {
    let r = client::request(sock, "PUT", path, Some(body), Duration::from_secs(30)).expect("API");
    assert!(r.status < 300, "{path}: {}", r.body);
}

fn wait_api(sock: &Path) {
    let start = Instant::now();
    while get(sock, "/").is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "no API");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Figures: (total ms, MiB sent, downtime ms).
type Figures = (f64, f64, f64);

fn vessel_run(dir: &Path, work: &str) -> Figures {
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 no_timer_check vessel.cmd={}",
        b64(work)
    );
    let mut src = vessel_guest(&default_kernel(), &cmdline)
        .arg("--api-sock")
        .arg(&a)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel");
    let out = lines(&mut src);
    let mut dst = Command::new(vessel_binary())
        .arg("run")
        .arg("--api-sock")
        .arg(&b)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel");
    wait_line(&out, "tick5");
    wait_api(&a);
    wait_api(&b);
    let url = format!("tcp:127.0.0.1:{}", free_port());
    put(&b, "/migration/receive", &format!(r#"{{"receiver_url": "{url}"}}"#));
    put(&a, "/migration/send", &format!(r#"{{"destination_url": "{url}"}}"#));
    let mut last = serde_json::Value::Null;
    loop {
        match get(&a, "/migration") {
            Some(m) if m["status"] == "completed" => {
                last = m;
                break;
            }
            Some(m) if m["status"] == "failed" || m["status"] == "cancelled" => panic!("vessel migration: {m}"),
            Some(m) => last = m,
            None => break,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let d = loop {
        let m = get(&b, "/migration").expect("destination API");
        if m["status"] == "completed" {
            break m;
        }
        assert_ne!(m["status"], "failed", "{m}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = src.wait();
    let _ = dst.kill();
    let _ = dst.wait();
    (
        last["total_time_ms"].as_f64().unwrap_or(f64::NAN),
        last["transferred_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
        d["downtime_ms"].as_f64().unwrap_or(f64::NAN),
    )
}

fn qemu_run(dir: &Path, work: &str) -> Figures {
    let (qa, qb) = (dir.join("qa.sock"), dir.join("qb.sock"));
    let _ = std::fs::remove_file(&qa);
    let _ = std::fs::remove_file(&qb);
    let cmdline = format!("console=ttyS0 reboot=t panic=-1 vessel.cmd={}", b64(work));
    let port = free_port();
    let qemu = |sock: &Path, extra: &[String]| {
        let mut c = qemu_guest(&default_kernel(), &cmdline);
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        c.spawn().expect("qemu-system-x86_64")
    };
    let mut src = qemu(&qa, &[]);
    let out = lines(&mut src);
    let mut dst = qemu(&qb, &["-incoming".into(), format!("tcp:127.0.0.1:{port}")]);
    wait_line(&out, "tick5");
    let mut q = qmp(&qa);
    let _qb = qmp(&qb);
    qmp_cmd(
        &mut q,
        &format!(r#"{{"execute": "migrate", "arguments": {{"uri": "tcp:127.0.0.1:{port}"}}}}"#),
    );
    let m = loop {
        let r = qmp_cmd(&mut q, r#"{"execute": "query-migrate"}"#);
        let s = &r["return"]["status"];
        if s == "completed" {
            break r["return"].clone();
        }
        assert!(s != "failed" && s != "cancelled", "QEMU migration: {r}");
        std::thread::sleep(Duration::from_millis(5));
    };
    for c in [&mut src, &mut dst] {
        let _ = c.kill();
        let _ = c.wait();
    }
    (
        m["total-time"].as_f64().unwrap_or(f64::NAN),
        m["ram"]["transferred"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
        m["downtime"].as_f64().unwrap_or(f64::NAN),
    )
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("vessel-mig-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    for (name, work) in [("idle", IDLE), ("dirtying 1 MiB/100 ms", DIRTY)] {
        let mut v: [Vec<f64>; 3] = Default::default();
        let mut q: [Vec<f64>; 3] = Default::default();
        for i in 0..runs {
            let a = vessel_run(&dir, work);
            let b = qemu_run(&dir, work);
            println!(
                "{name} run {}: vessel {:.0} ms, {:.1} MiB, downtime {:.0} ms; qemu {:.0} ms, {:.1} MiB, downtime {:.0} ms",
                i + 1,
                a.0,
                a.1,
                a.2,
                b.0,
                b.1,
                b.2
            );
            for (k, x) in [a.0, a.1, a.2].into_iter().enumerate() {
                v[k].push(x);
            }
            for (k, x) in [b.0, b.1, b.2].into_iter().enumerate() {
                q[k].push(x);
            }
        }
        let [vt, vb, vd] = v.map(|mut x| median(&mut x));
        let [qt, qb, qd] = q.map(|mut x| median(&mut x));
        println!(
            "{name} median: total vessel {vt:.0} ms / qemu {qt:.0} ms; sent vessel {vb:.1} MiB / qemu {qb:.1} MiB; downtime vessel {vd:.0} ms / qemu {qd:.0} ms"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
