//! Failover end to end, under emu (docs/FAILOVER.md): a guest printing a
//! numbered line every 100 ms is protected by a standby over a Unix
//! socket. SIGKILL of the primary at a random moment: the standby takes
//! over and the two consoles read as one run. The standby killed: the
//! primary runs on unprotected. The link cut with both alive: the primary
//! fences itself and the standby takes over, still one run. A corrupt
//! epoch: discarded, never applied, and nobody takes over.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The tests take turns: each runs two emu guests, and a starved VMM
/// misses its heartbeats.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Generous against a loaded CI host (the default is 500 ms).
const TIMEOUT_MS: &str = "1000";

const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo LINE$i; sleep 0.1; done";

fn failover(run_dir: &Path, name: &str) -> serde_json::Value {
    let r = vm_api(run_dir, name, "GET", "/failover", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn wait_status(run_dir: &Path, name: &str, want: &str, timeout: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let f = failover(run_dir, name);
        if f["status"] == want {
            return f;
        }
        assert!(start.elapsed() < timeout, "{name}: not {want} within {timeout:?}: {f}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigkill(run_dir: &Path, name: &str) {
    // SAFETY: kill(2) on a VMM this test started.
    unsafe { libc::kill(vm_pid(run_dir, name), libc::SIGKILL) };
}

/// A primary running the counter, and a standby listening on `listen`.
fn start_pair(run_dir: &Path, listen: &str) {
    start_pair_with(run_dir, listen, &[]);
}

fn start_pair_with(run_dir: &Path, listen: &str, standby_args: &[&str]) {
    launch(&mut detached(run_dir, "pri", "128M", COUNTER));
    let o = runtime_cmd(run_dir)
        .args(["run", "--detach", "--name", "sby", "--standby", listen])
        .args(standby_args)
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_status(run_dir, "sby", "waiting", Duration::from_secs(10));
    wait_line(run_dir, "pri", "LINE3", Duration::from_secs(180));
}

/// `vessel protect pri --standby URL`, then a few epochs.
fn protect(run_dir: &Path, url: &str) {
    let o = cli(
        run_dir,
        &["protect", "pri", "--standby", url, "--timeout-ms", TIMEOUT_MS],
    );
    assert!(
        o.status.success(),
        "vessel protect: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("is protected by"));
    let p = wait_status(run_dir, "pri", "protected", Duration::from_secs(5));
    assert_eq!(p["role"], "primary", "{p}");
    let s = wait_status(run_dir, "sby", "protected", Duration::from_secs(10));
    assert_eq!(s["role"], "standby", "{s}");
    let ps = String::from_utf8_lossy(&cli_ok(run_dir, &["ps"]).stdout).into_owned();
    assert!(
        ps.contains("primary protected") && ps.contains("standby protected"),
        "{ps}"
    );
    // Epochs flow and are acknowledged.
    let start = Instant::now();
    loop {
        let p = failover(run_dir, "pri");
        if p["epochs"].as_u64().unwrap_or(0) >= 5 {
            assert!(p["checkpoint_bytes"].as_u64().unwrap_or(0) > 0, "{p}");
            assert!(p["pause_ms"]["median"].as_f64().unwrap_or(0.0) > 0.0, "{p}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no epochs: {p}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The numbers of the LINEn lines of `text`.
fn numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("LINE")?.parse().ok())
        .collect()
}

/// The primary's console then the standby's read as one run: within each
/// no number is lost, repeated or out of order; at the junction the
/// standby goes on after the primary, having lost at most what the epochs
/// not yet released printed (`max_gap` lines). The one line that spans the
/// junction (a line cut between two epochs) is left out.
fn one_run(primary: &str, standby: &str, max_gap: u64) {
    let (p_whole, p_tail) = match primary.rfind('\n') {
        Some(i) => (&primary[..=i], &primary[i + 1..]),
        None => ("", primary),
    };
    let (s_head, s_whole) = match standby.find('\n') {
        Some(i) => (&standby[..=i], &standby[i + 1..]),
        None => (standby, ""),
    };
    let p = numbers(p_whole);
    let s = numbers(s_whole);
    let junction = format!("{p_tail}{s_head}");
    assert!(p.len() >= 3, "too little primary output:\n{primary}");
    assert!(s.len() >= 3, "too little standby output:\n{standby}");
    for part in [&p, &s] {
        for w in part.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "lost, repeated or out of order: {w:?}\n{primary}\n---\n{standby}"
            );
        }
    }
    let (last, first) = (*p.last().unwrap(), s[0]);
    assert!(
        first > last && first - last <= max_gap,
        "the standby's first whole line LINE{first} does not follow the primary's last LINE{last} \
         (junction {junction:?})"
    );
    eprintln!("one run: primary up to LINE{last}, standby from LINE{first}, junction {junction:?}");
}

/// A cheap random number (the test's moment to kill).
fn random_below(n: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (t ^ (t >> 7) ^ u64::from(std::process::id())) % n
}

#[test]
fn sigkill_of_the_primary_the_standby_takes_over_and_the_console_reads_as_one_run() {
    let _turn = turn();
    let s = Scratch::new("fo-kill-primary");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let url = format!("unix:{}", s.0.join("fo.sock").display());
    start_pair(&run_dir, &url);
    protect(&run_dir, &url);
    // Output is held until its epoch is acknowledged, then released: the
    // primary's console goes on while protected.
    let before = numbers(&console_log(&run_dir, "pri")).last().copied().unwrap_or(0);
    wait_line(&run_dir, "pri", &format!("LINE{}", before + 3), Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(random_below(2000)));
    sigkill(&run_dir, "pri");
    let killed = Instant::now();
    let f = wait_status(&run_dir, "sby", "took-over", Duration::from_secs(30));
    eprintln!("took over {} ms after the SIGKILL: {f}", killed.elapsed().as_millis());
    assert_eq!(f["role"], "primary", "{f}");
    assert_eq!(vm_api(&run_dir, "sby", "GET", "/", None).json()["state"], "Running");
    let primary = console_log(&run_dir, "pri");
    let last = numbers(&primary).last().copied().unwrap_or(0);
    wait_line(&run_dir, "sby", &format!("LINE{}", last + 10), Duration::from_secs(60));
    // Lost at most a few epochs' worth (10 lines: one second of output).
    one_run(&primary, &console_log(&run_dir, "sby"), 10);
    let ps = String::from_utf8_lossy(&cli_ok(&run_dir, &["ps"]).stdout).into_owned();
    assert!(ps.contains("primary took-over"), "{ps}");
}

#[test]
fn the_standby_killed_the_primary_runs_on_unprotected() {
    let _turn = turn();
    let s = Scratch::new("fo-kill-standby");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let url = format!("unix:{}", s.0.join("fo.sock").display());
    start_pair(&run_dir, &url);
    protect(&run_dir, &url);
    sigkill(&run_dir, "sby");
    let f = wait_status(&run_dir, "pri", "unprotected", Duration::from_secs(10));
    assert!(
        f["error"].as_str().unwrap_or_default().contains("standby is gone"),
        "{f}"
    );
    assert_eq!(f["output_held_bytes"], 0, "{f}");
    let log = std::fs::read_to_string(run_dir.join("pri").join("vmm.log")).unwrap_or_default();
    assert!(log.contains("UNPROTECTED"), "{log}");
    // It runs on, its output straight through, and it can be paused now.
    let last = numbers(&console_log(&run_dir, "pri")).last().copied().unwrap_or(0);
    wait_line(&run_dir, "pri", &format!("LINE{}", last + 5), Duration::from_secs(60));
    let l = console_log(&run_dir, "pri");
    let n = numbers(&l);
    for w in n.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{l}");
    }
    assert_eq!(vm_api(&run_dir, "pri", "GET", "/", None).json()["state"], "Running");
    let r = vm_api(&run_dir, "pri", "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 204, "{}", r.body);
}

/// A proxy between primary and standby that forwards both ways until
/// `cut` is set, then forwards nothing (and keeps both connections open,
/// as a dead link does); with `flip`, it flips one bit in the middle of the
/// next large chunk towards the standby, once.
fn proxy(listen: &Path, to: PathBuf, cut: Arc<AtomicBool>, flip: Arc<AtomicBool>) {
    let l = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let (mut from_pri, _) = l.accept().unwrap();
        let mut to_sby = UnixStream::connect(&to).unwrap();
        let (mut back_pri, mut back_sby) = (from_pri.try_clone().unwrap(), to_sby.try_clone().unwrap());
        let cut2 = cut.clone();
        let keep = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match back_sby.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if cut2.load(Ordering::Acquire) {
                    continue;
                }
                if back_pri.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            // Hold the primary's end open: a cut link closes nothing.
            std::thread::sleep(Duration::from_secs(600));
            drop(back_pri);
        });
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from_pri.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if cut.load(Ordering::Acquire) {
                continue;
            }
            if n >= 4096 && flip.swap(false, Ordering::AcqRel) {
                buf[n / 2] ^= 0x10;
            }
            if to_sby.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(600));
        drop(to_sby);
        let _ = keep.join();
    });
}

#[test]
fn the_link_cut_the_primary_fences_itself_and_the_standby_takes_over() {
    let _turn = turn();
    let s = Scratch::new("fo-link-cut");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let sby_sock = s.0.join("sby.sock");
    let proxy_sock = s.0.join("proxy.sock");
    start_pair(&run_dir, &format!("unix:{}", sby_sock.display()));
    let (cut, flip) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    proxy(&proxy_sock, sby_sock, cut.clone(), flip);
    protect(&run_dir, &format!("unix:{}", proxy_sock.display()));
    std::thread::sleep(Duration::from_millis(500 + random_below(1000)));
    cut.store(true, Ordering::Release);
    // Both alive: the standby takes over, the primary fences itself.
    let f = wait_status(&run_dir, "sby", "took-over", Duration::from_secs(30));
    assert!(
        f["error"]
            .as_str()
            .unwrap_or_default()
            .contains("nothing from the primary"),
        "{f}"
    );
    let p = wait_status(&run_dir, "pri", "fenced", Duration::from_secs(30));
    assert!(p["output_held_bytes"].as_u64().is_some(), "{p}");
    let fenced_log = fenced_primary_stays_silent(&run_dir);
    // Only one of them ran the guest visibly: still one run.
    one_run(&fenced_log, &console_log(&run_dir, "sby"), 10);
}

/// A fenced primary pauses, and releases no more output while the standby
/// runs on (ten more lines there); its console as it was when fenced.
fn fenced_primary_stays_silent(run_dir: &Path) -> String {
    let start = Instant::now();
    while vm_api(run_dir, "pri", "GET", "/", None).json()["state"] != "Paused" {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the fenced primary did not pause"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let fenced_log = console_log(run_dir, "pri");
    let last = numbers(&fenced_log).last().copied().unwrap_or(0);
    wait_line(run_dir, "sby", &format!("LINE{}", last + 10), Duration::from_secs(60));
    assert_eq!(
        console_log(run_dir, "pri"),
        fenced_log,
        "the fenced primary released output"
    );
    fenced_log
}

#[test]
fn a_corrupt_epoch_is_discarded_never_applied_and_nobody_takes_over() {
    let _turn = turn();
    let s = Scratch::new("fo-corrupt");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let sby_sock = s.0.join("sby.sock");
    let proxy_sock = s.0.join("proxy.sock");
    start_pair(&run_dir, &format!("unix:{}", sby_sock.display()));
    let (cut, flip) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    proxy(&proxy_sock, sby_sock, cut, flip.clone());
    protect(&run_dir, &format!("unix:{}", proxy_sock.display()));
    let applied = failover(&run_dir, "sby")["epochs"].as_u64().unwrap();
    flip.store(true, Ordering::Release);
    let f = wait_status(&run_dir, "sby", "failed", Duration::from_secs(30));
    let e = f["error"].as_str().unwrap_or_default();
    assert!(e.contains("corrupt") || e.contains("discarded"), "{f}");
    assert!(f["epochs"].as_u64().unwrap() >= applied, "{f}");
    // The standby runs nothing; the primary, told, runs on unprotected.
    assert_eq!(vm_api(&run_dir, "sby", "GET", "/", None).json()["state"], "Not started");
    let p = wait_status(&run_dir, "pri", "unprotected", Duration::from_secs(10));
    assert!(p["error"].as_str().unwrap_or_default().contains("gave up"), "{p}");
    let last = numbers(&console_log(&run_dir, "pri")).last().copied().unwrap_or(0);
    wait_line(&run_dir, "pri", &format!("LINE{}", last + 5), Duration::from_secs(60));
    let l = console_log(&run_dir, "pri");
    for w in numbers(&l).windows(2) {
        assert_eq!(w[1], w[0] + 1, "{l}");
    }
    assert_eq!(vm_api(&run_dir, "sby", "GET", "/", None).json()["state"], "Not started");
}

/// Manual mode, a drill: the primary is alive; PUT /failover/takeover on
/// the standby makes it take over and tell the primary, which fences
/// itself. Still one run.
#[test]
fn a_forced_takeover_fences_the_live_primary() {
    let _turn = turn();
    let s = Scratch::new("fo-forced");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let url = format!("unix:{}", s.0.join("fo.sock").display());
    start_pair_with(&run_dir, &url, &["--manual-takeover"]);
    protect(&run_dir, &url);
    let r = vm_api(&run_dir, "sby", "PUT", "/failover/takeover", None);
    assert_eq!(r.status, 204, "{}", r.body);
    let f = wait_status(&run_dir, "sby", "took-over", Duration::from_secs(30));
    assert!(f["error"].as_str().unwrap_or_default().contains("forced"), "{f}");
    let p = wait_status(&run_dir, "pri", "fenced", Duration::from_secs(30));
    assert!(p["error"].as_str().unwrap_or_default().contains("took over"), "{p}");
    let fenced_log = fenced_primary_stays_silent(&run_dir);
    one_run(&fenced_log, &console_log(&run_dir, "sby"), 10);
    // The operator resumes the fenced primary only when sure the standby
    // is dead; here it is not, but the request works: unprotected.
    let r = vm_api(&run_dir, "pri", "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(failover(&run_dir, "pri")["status"], "unprotected");
}

#[test]
fn protect_refuses_what_it_cannot_hold_back() {
    let _turn = turn();
    let s = Scratch::new("fo-refuse");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let disk = s.blank("data.raw", 1 << 20);
    launch(detached(&run_dir, "pri", "128M", COUNTER).args(["--disk", &disk_arg(&disk, "")]));
    wait_line(&run_dir, "pri", "LINE1", Duration::from_secs(180));
    let r = vm_api(
        &run_dir,
        "pri",
        "PUT",
        "/failover/protect",
        Some(r#"{"standby_url": "unix:/nonexistent.sock"}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("writable disk"), "{}", r.body);
    let r = vm_api(&run_dir, "pri", "PUT", "/failover/takeover", None);
    assert_eq!(r.status, 400, "{}", r.body);
}
