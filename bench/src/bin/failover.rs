//! Failover (docs/FAILOVER.md) on this host, engine emu, 128 MiB guest:
//!   - the CPU workload's slowdown when protected against the same guest
//!     unprotected just before, at epochs of 25, 50 and 100 ms;
//!   - the guest's pause per epoch (the primary's GET /failover);
//!   - the time from SIGKILL of the primary to the standby's API saying
//!     took-over, and to the guest's next console line from the standby.
//!
//! The guest runs a shell CPU loop between START and END lines (timed on
//! the host from the console; protected, the END line is held until its
//! epoch is acknowledged, which the figure includes) and a ticker printing
//! every 100 ms. No QEMU column: QEMU's COLO needs its network proxy
//! (colo-compare) and block replication, which this test guest has no
//! counterpart for; see docs/BENCHMARKS.md.
//!
//! Usage: cargo run --release -p vessel-bench --bin failover -- [ROUNDS]
//! (after `cargo build --release -p vessel` and `guest/build-all.sh`).
//!
//! `failover -- net [SECONDS]` (root: a network namespace with a TAP)
//! measures the network request/response workload instead: a TCP client
//! in the namespace sends `inc` and reads the guest's answer (busybox `nc
//! -e` running a counter), over and over, for SECONDS (default 5)
//! unprotected, then as long protected (each answer is held until its
//! epoch is acknowledged); then SIGKILL of the primary and the time until
//! the client's next answer, from the standby, on the same connection.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vessel::api::client;
use vessel_bench::{b64, cache, default_kernel, median, vessel_binary};

const WORK: &str = "(while true; do echo tick; sleep 0.1; done) & \
    while true; do echo START; s=1; i=0; while [ $i -lt 2000 ]; do s=$(( (s*31 + i) % 1000003 )); i=$((i+1)); done; echo END$s; done";

/// Above the default 500 ms: on an oversubscribed host a starved VMM
/// misses heartbeats, and a false failover (correct, but not what is
/// measured) spoils the run.
const TIMEOUT_MS: u64 = 2000;

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

fn next(rx: &mpsc::Receiver<(Instant, String)>, what: &str) -> Instant {
    loop {
        let (t, l) = rx.recv_timeout(Duration::from_secs(300)).expect("guest output");
        if l.contains(what) {
            return t;
        }
    }
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

/// The durations of `n` whole START..END rounds, in s.
fn rounds(rx: &mpsc::Receiver<(Instant, String)>, n: usize) -> Vec<f64> {
    // Finish the round in progress first.
    next(rx, "END");
    (0..n)
        .map(|_| {
            let s = next(rx, "START");
            let e = next(rx, "END");
            e.duration_since(s).as_secs_f64()
        })
        .collect()
}

struct Figures {
    unprotected_s: f64,
    protected_s: f64,
    pause_median_ms: f64,
    pause_p99_ms: f64,
    to_took_over_ms: f64,
    to_serving_ms: f64,
}

fn run(dir: &Path, epoch_ms: u64, n: usize) -> Figures {
    let (a, b, fo) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("fo.sock"));
    for p in [&a, &b, &fo] {
        let _ = std::fs::remove_file(p);
    }
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 no_timer_check vessel.cmd={}",
        b64(WORK)
    );
    let mut pri = Command::new(vessel_binary())
        .args(["run", "--accel", "emu", "--mem", "128M"])
        .arg("--kernel")
        .arg(default_kernel())
        .arg("--initrd")
        .arg(cache().join("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(&cmdline)
        .arg("--api-sock")
        .arg(&a)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel");
    let pri_out = lines(&mut pri);
    let mut sby = Command::new(vessel_binary())
        .args(["run", "--api-sock"])
        .arg(&b)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel");
    let sby_out = lines(&mut sby);
    next(&pri_out, "START");
    wait_api(&a);
    wait_api(&b);
    let unprotected = rounds(&pri_out, n);
    protect(&a, &b, &fo, epoch_ms);
    let protected = rounds(&pri_out, n);
    let f = get(&a, "/failover").expect("primary API");
    // SIGKILL, then how long until the standby serves.
    let killed = Instant::now();
    let _ = pri.kill();
    let took_over = loop {
        let s = get(&b, "/failover").expect("standby API");
        if s["status"] == "took-over" {
            break killed.elapsed();
        }
        assert_ne!(s["status"], "failed", "{s}");
        std::thread::sleep(Duration::from_millis(2));
    };
    let serving = next(&sby_out, "tick").duration_since(killed);
    let _ = pri.wait();
    let _ = sby.kill();
    let _ = sby.wait();
    let mut u = unprotected;
    let mut p = protected;
    Figures {
        unprotected_s: median(&mut u),
        protected_s: median(&mut p),
        pause_median_ms: f["pause_ms"]["median"].as_f64().unwrap_or(f64::NAN),
        pause_p99_ms: f["pause_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
        to_took_over_ms: took_over.as_secs_f64() * 1e3,
        to_serving_ms: serving.as_secs_f64() * 1e3,
    }
}

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(
        o.status.success(),
        "ip {args:?}: {} (the net bench needs root)",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A network namespace with a persistent TAP `fbtap0` (host end
/// 10.78.0.1/24), removed when dropped.
struct NetNs(String);

impl NetNs {
    fn new() -> NetNs {
        let name = format!("vessel-fobench-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = NetNs(name.clone());
        ip(&["-n", &name, "tuntap", "add", "fbtap0", "mode", "tap"]);
        ip(&["-n", &name, "addr", "add", "10.78.0.1/24", "dev", "fbtap0"]);
        ip(&["-n", &name, "link", "set", "fbtap0", "up"]);
        ns
    }

    fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(vessel_binary());
        c
    }

    /// Run `f` on a thread inside the namespace.
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            use std::os::unix::io::AsRawFd;
            // SAFETY: setns on a namespace fd we opened; it changes only
            // this thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

const NET_WORK: &str = "ip addr add 10.78.0.2/24 dev eth0 && ip link set eth0 up && \
    printf 'n=0; while read l; do n=$((n+1)); echo $n; done\n' > /tmp/counter.sh && \
    echo NET-UP && nc -l -p 5000 -e sh /tmp/counter.sh; echo NC-ENDED; sleep 1000000";

struct NetFigures {
    unprotected_rps: f64,
    protected_rps: f64,
    pause_median_ms: f64,
    pause_p99_ms: f64,
    to_took_over_ms: f64,
    to_answer_ms: f64,
}

/// Answers in `[from, to)` per second.
fn rate(answers: &std::sync::Mutex<Vec<Instant>>, from: Instant, to: Instant) -> f64 {
    let a = answers.lock().unwrap();
    let n = a.iter().filter(|&&t| t >= from && t < to).count();
    n as f64 / to.duration_since(from).as_secs_f64()
}

fn run_net(dir: &Path, epoch_ms: u64, secs: u64) -> NetFigures {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let (a, b, fo) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("fo.sock"));
    for p in [&a, &b, &fo] {
        let _ = std::fs::remove_file(p);
    }
    let ns = NetNs::new();
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 no_timer_check vessel.cmd={}",
        b64(NET_WORK)
    );
    let mut pri = ns
        .exec()
        .args(["run", "--accel", "emu", "--mem", "128M"])
        .arg("--kernel")
        .arg(default_kernel())
        .arg("--initrd")
        .arg(cache().join("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(&cmdline)
        .args(["--net", "tap=fbtap0,mac=52:54:00:12:34:5a"])
        .arg("--api-sock")
        .arg(&a)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel");
    let pri_out = lines(&mut pri);
    let mut sby = ns
        .exec()
        .args(["run", "--api-sock"])
        .arg(&b)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel");
    next(&pri_out, "NET-UP");
    wait_api(&a);
    wait_api(&b);
    let answers = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (answers, stop) = (answers.clone(), stop.clone());
        ns.spawn(move || -> Result<u64, String> {
            let start = Instant::now();
            let conn = loop {
                match std::net::TcpStream::connect("10.78.0.2:5000") {
                    Ok(c) => break c,
                    Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(format!("connect: {e}")),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let _ = conn.set_nodelay(true);
            let mut w = conn.try_clone().unwrap();
            let mut r = BufReader::new(conn);
            let mut last = 0u64;
            while !stop.load(Ordering::Acquire) {
                w.write_all(b"inc\n").map_err(|e| format!("after {last}: {e}"))?;
                let mut line = String::new();
                if r.read_line(&mut line).map_err(|e| format!("after {last}: {e}"))? == 0 {
                    return Err(format!("ended after {last}"));
                }
                let v: u64 = line.trim().parse().map_err(|_| format!("bad answer {line:?}"))?;
                if v != last + 1 {
                    return Err(format!("answered {v} after {last}"));
                }
                last = v;
                answers.lock().unwrap().push(Instant::now());
            }
            Ok(last)
        })
    };
    let window = Duration::from_secs(secs);
    // Warm up (the connection, the guest's shell), then measure.
    while answers.lock().unwrap().len() < 20 {
        assert!(!client.is_finished(), "the client ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    std::thread::sleep(window);
    let unprotected_rps = rate(&answers, t0, Instant::now());
    protect(&a, &b, &fo, epoch_ms);
    std::thread::sleep(Duration::from_millis(500));
    let t1 = Instant::now();
    std::thread::sleep(window);
    let protected_rps = rate(&answers, t1, Instant::now());
    let f = get(&a, "/failover").expect("primary API");
    let killed = Instant::now();
    let _ = pri.kill();
    let took_over = loop {
        let s = get(&b, "/failover").expect("standby API");
        if s["status"] == "took-over" {
            break killed.elapsed();
        }
        assert_ne!(s["status"], "failed", "{s}");
        std::thread::sleep(Duration::from_millis(2));
    };
    let answered = loop {
        if let Some(&t) = answers.lock().unwrap().iter().find(|&&t| t > killed) {
            break t.duration_since(killed);
        }
        assert!(!client.is_finished(), "the client ended: {:?}", client.join());
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "no answer after the takeover"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    stop.store(true, Ordering::Release);
    let _ = pri.wait();
    let _ = sby.kill();
    let _ = sby.wait();
    let _ = client.join();
    NetFigures {
        unprotected_rps,
        protected_rps,
        pause_median_ms: f["pause_ms"]["median"].as_f64().unwrap_or(f64::NAN),
        pause_p99_ms: f["pause_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
        to_took_over_ms: took_over.as_secs_f64() * 1e3,
        to_answer_ms: answered.as_secs_f64() * 1e3,
    }
}

fn main_net(secs: u64) {
    let dir = std::env::temp_dir().join(format!("vessel-fo-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    println!("epoch_ms | req/s unprotected | req/s protected | slowdown | pause median | pause p99 | SIGKILL->took-over | SIGKILL->next answer");
    for epoch_ms in [25, 50, 100] {
        let f = run_net(&dir, epoch_ms, secs);
        println!(
            "{epoch_ms} | {:.1} | {:.1} | {:.1}x | {:.2} ms | {:.2} ms | {:.0} ms | {:.0} ms",
            f.unprotected_rps,
            f.protected_rps,
            f.unprotected_rps / f.protected_rps,
            f.pause_median_ms,
            f.pause_p99_ms,
            f.to_took_over_ms,
            f.to_answer_ms
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("net") {
        let secs = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(5);
        main_net(secs);
        return;
    }
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("vessel-fo-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    println!("epoch_ms | CPU round unprotected | protected | slowdown | pause median | pause p99 | SIGKILL->took-over | SIGKILL->guest output");
    for epoch_ms in [25, 50, 100] {
        let f = run(&dir, epoch_ms, n);
        println!(
            "{epoch_ms} | {:.2} s | {:.2} s | {:.2}x | {:.2} ms | {:.2} ms | {:.0} ms | {:.0} ms",
            f.unprotected_s,
            f.protected_s,
            f.protected_s / f.unprotected_s,
            f.pause_median_ms,
            f.pause_p99_ms,
            f.to_took_over_ms,
            f.to_serving_ms
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Make the VM behind API socket `b` a standby listening on `fo`, protect
/// the one behind `a` with it, and wait until the initial sync is done.
fn protect(a: &Path, b: &Path, fo: &Path, epoch_ms: u64) {
    put(
        b,
        "/failover/standby",
        &format!(r#"{{"listen_url": "unix:{}"}}"#, fo.display()),
    );
    put(
        a,
        "/failover/protect",
        &format!(
            r#"{{"standby_url": "unix:{}", "epoch_ms": {epoch_ms}, "timeout_ms": {TIMEOUT_MS}}}"#,
            fo.display()
        ),
    );
    let start = Instant::now();
    while get(a, "/failover").expect("primary API")["status"] != "protected" {
        assert!(start.elapsed() < Duration::from_secs(60), "never protected");
        std::thread::sleep(Duration::from_millis(10));
    }
}
