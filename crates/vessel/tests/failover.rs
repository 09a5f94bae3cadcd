//! Failover end to end, under emu (docs/FAILOVER.md): a guest printing a
//! numbered line every 100 ms is protected by a standby over a Unix
//! socket. SIGKILL of the primary at a random moment: the standby takes
//! over and the two consoles read as one run. The standby killed: the
//! primary runs on unprotected. The link cut with both alive: the primary
//! fences itself and the standby takes over, still one run. A corrupt
//! epoch: discarded, never applied, and nobody takes over. The network: a
//! TCP client through a TAP loses no acknowledged increment across a
//! SIGKILL. The disk: every record reported synced is in the image. vsock:
//! nothing reaches the host before its epoch is acknowledged.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::NetNs;
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
    protect_with(run_dir, url, TIMEOUT_MS);
}

/// For the tests that stop the standby's acknowledgements for
/// [`ACKS_STOPPED`]: long enough that neither side gives up meanwhile.
const HOLD_TIMEOUT_MS: &str = "8000";
const ACKS_STOPPED: Duration = Duration::from_secs(3);

/// Stop (SIGSTOP) or continue (SIGCONT) the standby's VMM: while stopped
/// it acknowledges no epoch, and the link stays up.
fn signal_standby(run_dir: &Path, signal: i32) {
    // SAFETY: kill(2) on a VMM this test started.
    let rc = unsafe { libc::kill(vm_pid(run_dir, "sby"), signal) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

fn protect_with(run_dir: &Path, url: &str, timeout_ms: &str) {
    let o = cli(
        run_dir,
        &["protect", "pri", "--standby", url, "--timeout-ms", timeout_ms],
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
            assert!(p["disk_held_bytes"].as_u64().is_some(), "{p}");
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

/// The virtio-console's output goes through the same gate: a guest
/// printing a numbered line every 100 ms to /dev/hvc0 (an output file
/// both VMMs append to, as the state names it); SIGKILL of the primary at
/// a random moment; the file reads as one run (the primary's part, then
/// the standby's, nothing repeated, at most a second lost).
#[test]
fn sigkill_of_the_primary_the_virtio_console_file_reads_as_one_run() {
    let _turn = turn();
    let s = Scratch::new("fo-hvc");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let hvc = s.0.join("hvc0.log");
    let work = "i=0; while true; do i=$((i+1)); echo LINE$i > /dev/hvc0; echo TICK$i; sleep 0.1; done";
    launch(detached(&run_dir, "pri", "128M", work).args(["--console-output", &hvc.display().to_string()]));
    let url = format!("unix:{}", s.0.join("fo.sock").display());
    let o = runtime_cmd(&run_dir)
        .args(["run", "--detach", "--name", "sby", "--standby", &url])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_status(&run_dir, "sby", "waiting", Duration::from_secs(10));
    wait_line(&run_dir, "pri", "TICK3", Duration::from_secs(180));
    protect(&run_dir, &url);
    let hvc_lines = || numbers(&std::fs::read_to_string(&hvc).unwrap_or_default());
    let before = hvc_lines().last().copied().unwrap_or(0);
    // Released as epochs are acknowledged: the file grows while protected.
    let start = Instant::now();
    while hvc_lines().last().copied().unwrap_or(0) < before + 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the console file stopped growing"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(random_below(2000)));
    let pri_pid = vm_pid(&run_dir, "pri");
    sigkill(&run_dir, "pri");
    // Until its files are closed: what it wrote is all it will write.
    let start = Instant::now();
    while std::fs::read_dir(format!("/proc/{pri_pid}/fd")).is_ok_and(|mut d| d.next().is_some()) {
        assert!(start.elapsed() < Duration::from_secs(10), "the primary did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    let primary = std::fs::read_to_string(&hvc).unwrap_or_default();
    let last = numbers(&primary).last().copied().unwrap_or(0);
    wait_status(&run_dir, "sby", "took-over", Duration::from_secs(30));
    let start = Instant::now();
    while hvc_lines().last().copied().unwrap_or(0) < last + 10 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the standby's console output did not go on:\n{}",
            std::fs::read_to_string(&hvc).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let all = std::fs::read_to_string(&hvc).unwrap();
    one_run(&primary, &all[primary.len()..], 10);
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

/// Each connection the guest made to the host's vsock port, as the lines
/// (`VLINEn` numbers) that came on it, in order; a connection's last line
/// may be cut (its VMM died mid-write) and is left out.
type VsockLines = Arc<std::sync::Mutex<Vec<Vec<u64>>>>;

fn vsock_host_listener(path: &Path) -> VsockLines {
    let listener = UnixListener::bind(path).unwrap();
    let lines: VsockLines = Arc::default();
    let all = lines.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let all = all.clone();
            let conn = {
                let mut a = all.lock().unwrap();
                a.push(Vec::new());
                a.len() - 1
            };
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(s);
                let mut line = String::new();
                loop {
                    line.clear();
                    match std::io::BufRead::read_line(&mut r, &mut line) {
                        Ok(n) if n > 0 && line.ends_with('\n') => {}
                        _ => return,
                    }
                    let n = line
                        .trim()
                        .strip_prefix("VLINE")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| panic!("a bad line from the guest: {line:?}"));
                    all.lock().unwrap()[conn].push(n);
                }
            });
        }
    });
    lines
}

fn vsock_count(lines: &VsockLines) -> usize {
    lines.lock().unwrap().iter().map(Vec::len).sum()
}

fn wait_vsock(lines: &VsockLines, at_least: usize, timeout: Duration) {
    let start = Instant::now();
    while vsock_count(lines) < at_least {
        assert!(
            start.elapsed() < timeout,
            "only {} vsock lines within {timeout:?}: {:?}",
            vsock_count(lines),
            lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The counter lives in a file (tmpfs: guest memory), so that after a
/// reset connection the next one goes on with the next number.
const VSOCK_WORK: &str = "echo 0 > /tmp/n; while true; do \
    while true; do i=$(cat /tmp/n); i=$((i+1)); echo $i > /tmp/n; echo VLINE$i; sleep 0.1; done \
    | vessel-agent connect 2 5000; echo RECONNECT; sleep 0.2; done";

/// Wait until the guest sent `n` lines on a second connection (after a
/// takeover), then check the lines over both read as one run.
fn vsock_one_run_after_takeover(lines: &VsockLines, run_dir: &Path) {
    let start = Instant::now();
    loop {
        let conns = lines.lock().unwrap().clone();
        if conns.len() >= 2 && conns.last().unwrap().len() >= 5 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the guest did not send over vsock again after the takeover: {conns:?}\n{}",
            console_log(run_dir, "sby")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let conns = lines.lock().unwrap().clone();
    assert_eq!(
        conns.len(),
        2,
        "one connection before the takeover, one after: {conns:?}"
    );
    assert_eq!(conns[0][0], 1, "{conns:?}");
    for part in &conns {
        for w in part.windows(2) {
            assert_eq!(w[1], w[0] + 1, "lost, repeated or out of order: {w:?} in {conns:?}");
        }
    }
    let (last, first) = (*conns[0].last().unwrap(), conns[1][0]);
    assert!(
        first > last && first - last <= 30,
        "after the takeover VLINE{first} does not follow VLINE{last}: {conns:?}"
    );
    eprintln!("vsock one run: primary up to VLINE{last}, standby from VLINE{first}");
}

/// A forced takeover while the primary lives: the fenced primary lets go
/// of its vsock `uds_path` so that the standby can bind it; the guest's
/// lines over vsock read as one run across the takeover.
#[test]
fn a_forced_takeover_hands_the_vsock_socket_to_the_standby() {
    let _turn = turn();
    let s = Scratch::new("fo-vsock-forced");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let uds = s.0.join("v.sock");
    let mut port = uds.clone().into_os_string();
    port.push("_5000");
    let lines = vsock_host_listener(Path::new(&port));
    launch(detached(&run_dir, "pri", "128M", VSOCK_WORK).args(["--vsock", &format!("cid=3,uds={}", uds.display())]));
    let url = format!("unix:{}", s.0.join("fo.sock").display());
    let o = runtime_cmd(&run_dir)
        .args([
            "run",
            "--detach",
            "--name",
            "sby",
            "--standby",
            &url,
            "--manual-takeover",
        ])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_status(&run_dir, "sby", "waiting", Duration::from_secs(10));
    wait_vsock(&lines, 3, Duration::from_secs(180));
    protect(&run_dir, &url);
    wait_vsock(&lines, vsock_count(&lines) + 3, Duration::from_secs(60));
    let r = vm_api(&run_dir, "sby", "PUT", "/failover/takeover", None);
    assert_eq!(r.status, 204, "{}", r.body);
    let f = wait_status(&run_dir, "sby", "took-over", Duration::from_secs(30));
    eprintln!("took over: {f}");
    wait_status(&run_dir, "pri", "fenced", Duration::from_secs(30));
    vsock_one_run_after_takeover(&lines, &run_dir);
    assert!(uds.exists(), "the standby does not listen on {}", uds.display());
}

/// vsock output commit: the guest sends a numbered line every 100 ms over
/// vsock to a host listener (`<uds>_5000`). While protected, the standby
/// stopped (SIGSTOP) for 3 s acknowledges no epoch: nothing new reaches
/// the host meanwhile, though the guest goes on sending (the gate holds
/// it); continued, everything arrives, in order. Then SIGKILL of the
/// primary: the standby binds the same `uds_path`, the guest's connection
/// is reset (as after a snapshot restore) and it connects again; the
/// host's lines over both connections read as one run (nothing repeated
/// or out of order; lost at most what the unreleased epochs sent).
#[test]
fn vsock_output_is_held_until_its_epoch_is_acknowledged_and_survives_a_takeover() {
    let _turn = turn();
    let s = Scratch::new("fo-vsock");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let uds = s.0.join("v.sock");
    let mut port = uds.clone().into_os_string();
    port.push("_5000");
    let lines = vsock_host_listener(Path::new(&port));
    launch(detached(&run_dir, "pri", "128M", VSOCK_WORK).args(["--vsock", &format!("cid=3,uds={}", uds.display())]));
    let url = format!("unix:{}", s.0.join("fo.sock").display());
    let o = runtime_cmd(&run_dir)
        .args(["run", "--detach", "--name", "sby", "--standby", &url])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_status(&run_dir, "sby", "waiting", Duration::from_secs(10));
    wait_vsock(&lines, 3, Duration::from_secs(180));
    protect_with(&run_dir, &url, HOLD_TIMEOUT_MS);
    // Released epoch by epoch while protected.
    let at_protect = vsock_count(&lines);
    wait_vsock(&lines, at_protect + 5, Duration::from_secs(60));
    // No acknowledgement: nothing more reaches the host (an ack already
    // on its way when the standby stopped is let through first).
    signal_standby(&run_dir, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    let before = vsock_count(&lines);
    std::thread::sleep(ACKS_STOPPED);
    let during = vsock_count(&lines);
    let held = failover(&run_dir, "pri");
    signal_standby(&run_dir, libc::SIGCONT);
    assert_eq!(
        during,
        before,
        "{} vsock lines reached the host while the standby acknowledged nothing",
        during - before
    );
    // The guest went on sending meanwhile: its lines come now (at 10 a
    // second, 3 s held; emu on a loaded host is slower, so at least 5).
    wait_vsock(&lines, during + 5, Duration::from_secs(5));
    let resumed = vsock_count(&lines);
    eprintln!("vsock: {at_protect} lines at protection, {before} when acks stopped, {during} after 3 s, {resumed} 5 s after; held then: {held}");
    assert!(
        held["output_held_bytes"].as_u64().unwrap_or(0) > 0,
        "nothing held while the standby was stopped: {held}"
    );
    std::thread::sleep(Duration::from_millis(random_below(2000)));
    sigkill(&run_dir, "pri");
    let f = wait_status(&run_dir, "sby", "took-over", Duration::from_secs(30));
    eprintln!("took over: {f}");
    // The standby's guest connects again and goes on.
    vsock_one_run_after_takeover(&lines, &run_dir);
}

/// RARP frames from `mac` seen on the namespace's `tap` until `stop`: an
/// AF_PACKET socket bound to the TAP sees what a VMM writes into it.
fn count_rarp(tap: &str, mac: [u8; 6], stop: Arc<AtomicBool>) -> usize {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const ETH_P_RARP: u16 = 0x8035;
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_RARP.to_be())) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor only this owner closes.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(tap).unwrap();
    // SAFETY: a NUL-terminated interface name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {tap}");
    // SAFETY: sockaddr_ll is plain data; zeroes are a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_RARP.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: bind with a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the size given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let mut seen = 0;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Acquire) {
        // SAFETY: recv into `buf`, which is buf.len() long.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 42 {
            let f = &buf[..n as usize];
            if f[6..12] == mac && f[12..14] == ETH_P_RARP.to_be_bytes() && f[20..22] == [0, 3] && f[22..28] == mac {
                seen += 1;
            }
        }
    }
    seen
}

/// The network: a TCP client on the host (in a namespace, through a TAP)
/// keeps incrementing a counter the guest serves (one request line, one
/// answer line: the new value). SIGKILL of the primary at a random moment:
/// the standby opens the same TAP, announces the guest (RARP), and the
/// client's connection carries on with every answer exactly one more than
/// the last it saw, so no increment it saw acknowledged was lost (the
/// primary's answers were held until their epoch was acknowledged).
/// Before the kill, the standby is stopped (SIGSTOP) for 3 s: the client
/// must see no answer meanwhile (the gate holds network frames), and the
/// counter goes on once it continues.
#[test]
fn sigkill_of_the_primary_a_tcp_counter_client_carries_on_with_nothing_lost() {
    let _turn = turn();
    let s = Scratch::new("fo-net");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let ns = NetNs::new("fo", "ftap0", "10.79.0.1/24");
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x58];
    let work = "ip addr add 10.79.0.2/24 dev eth0 && ip link set eth0 up && \
                printf 'n=0; while read l; do n=$((n+1)); echo $n; done\\n' > /tmp/counter.sh && \
                echo NET-UP && nc -l -p 5000 -e sh /tmp/counter.sh; echo NC-ENDED; sleep 1000000";
    let pri = detached(&run_dir, "pri", "128M", work);
    launch(ns.wrap(&pri).args(["--net", "tap=ftap0,mac=52:54:00:12:34:58"]));
    let url = format!("unix:{}", s.0.join("fo.sock").display());
    let mut sby = runtime_cmd(&run_dir);
    sby.args(["run", "--detach", "--name", "sby", "--standby", &url]);
    launch(&mut ns.wrap(&sby));
    wait_status(&run_dir, "sby", "waiting", Duration::from_secs(10));
    wait_log(&run_dir, "pri", "NET-UP", Duration::from_secs(180));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (acked, stop) = (acked.clone(), stop.clone());
        ns.spawn(move || -> Result<u64, String> {
            let start = Instant::now();
            let conn = loop {
                match std::net::TcpStream::connect("10.79.0.2:5000") {
                    Ok(c) => break c,
                    Err(e) if start.elapsed() > Duration::from_secs(60) => {
                        return Err(format!("cannot connect to the guest: {e}"))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut w = conn.try_clone().unwrap();
            let mut r = std::io::BufReader::new(conn);
            let mut last = 0u64;
            while !stop.load(Ordering::Acquire) {
                w.write_all(b"inc\n").map_err(|e| format!("after {last}: {e}"))?;
                let mut line = String::new();
                let n = std::io::BufRead::read_line(&mut r, &mut line).map_err(|e| format!("after {last}: {e}"))?;
                if n == 0 {
                    return Err(format!("the connection ended after {last}"));
                }
                let v: u64 = line
                    .trim()
                    .parse()
                    .map_err(|_| format!("after {last}: a bad answer {line:?}"))?;
                if v != last + 1 {
                    return Err(format!(
                        "the counter answered {v} after {last}: an increment lost or repeated"
                    ));
                }
                last = v;
                acked.store(last, Ordering::Release);
            }
            Ok(last)
        })
    };
    let wait_for = |what: &str, n: u64, client: &std::thread::JoinHandle<Result<u64, String>>| {
        let start = Instant::now();
        while acked.load(Ordering::Acquire) < n {
            if client.is_finished() {
                return false;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the counter stalled before {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    };
    let logs = |run_dir: &Path| {
        format!(
            "pri console:\n{}\nsby console:\n{}\nsby log:\n{}",
            console_log(run_dir, "pri"),
            console_log(run_dir, "sby"),
            std::fs::read_to_string(run_dir.join("sby").join("vmm.log")).unwrap_or_default()
        )
    };
    if !wait_for("protection", 20, &client) {
        panic!("the client stopped: {:?}\n{}", client.join(), logs(&run_dir));
    }
    protect_with(&run_dir, &url, HOLD_TIMEOUT_MS);
    let protected_at = acked.load(Ordering::Acquire);
    // Answers go on while protected (released as epochs are acknowledged).
    if !wait_for("the stop", protected_at + 20, &client) {
        panic!("the client stopped: {:?}\n{}", client.join(), logs(&run_dir));
    }
    // The standby stopped, no epoch is acknowledged: the guest's answers
    // are held, so the client sees none (after the moment it takes for an
    // acknowledgement already on its way to arrive).
    signal_standby(&run_dir, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    let at_stop = acked.load(Ordering::Acquire);
    std::thread::sleep(ACKS_STOPPED);
    let after_stop = acked.load(Ordering::Acquire);
    let held = failover(&run_dir, "pri");
    signal_standby(&run_dir, libc::SIGCONT);
    assert_eq!(
        after_stop,
        at_stop,
        "the client saw answers {}..={after_stop} while the standby acknowledged no epoch: \
         network frames left the primary before their epoch was acknowledged",
        at_stop + 1
    );
    assert!(
        held["output_held_bytes"].as_u64().unwrap_or(0) > 0,
        "nothing held while the standby was stopped: {held}"
    );
    // Acknowledged again: the held answers go out, the counter goes on.
    if !wait_for("the kill", after_stop + 20, &client) {
        panic!("the client stopped: {:?}\n{}", client.join(), logs(&run_dir));
    }
    let rarp = {
        let stop = stop.clone();
        ns.spawn(move || count_rarp("ftap0", mac, stop))
    };
    std::thread::sleep(Duration::from_millis(random_below(2000)));
    sigkill(&run_dir, "pri");
    let at_kill = acked.load(Ordering::Acquire);
    let f = wait_status(&run_dir, "sby", "took-over", Duration::from_secs(30));
    eprintln!("took over: {f}");
    let went_on = wait_for("the end", at_kill + 30, &client);
    stop.store(true, Ordering::Release);
    let last = client
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&run_dir)));
    assert!(went_on, "the client stopped at {last}");
    eprintln!(
        "counter: {protected_at} when protected, {at_stop} while the standby was stopped, \
         {at_kill} at the SIGKILL, {last} in all"
    );
    assert!(!console_log(&run_dir, "sby").contains("NC-ENDED"), "{}", logs(&run_dir));
    let rarps = rarp.join().unwrap();
    assert!(
        rarps >= 1,
        "the standby announced nothing (no RARP from the guest's MAC)"
    );
    eprintln!("{rarps} RARP announcements seen");
}

/// The highest SYNCEDn in a console log.
fn last_synced(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("SYNCED")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The highest n of a record `RECn\n` anywhere in the raw image `image`
/// (the file's data block as the host sees it, not through any cache of
/// the VMM's).
fn highest_record_in(image: &Path) -> u64 {
    let bytes = std::fs::read(image).unwrap();
    let mut highest = 0;
    for i in 0..bytes.len().saturating_sub(3) {
        if &bytes[i..i + 3] != b"REC" {
            continue;
        }
        let digits = bytes[i + 3..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 12 || bytes.get(i + 3 + digits) != Some(&b'\n') {
            continue;
        }
        let n: u64 = std::str::from_utf8(&bytes[i + 3..i + 3 + digits])
            .unwrap()
            .parse()
            .unwrap();
        highest = highest.max(n);
    }
    highest
}

/// `PROGRAM ARGS` (e2fsprogs), which must be there; its output.
fn tool(program: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .timed_output()
        .unwrap_or_else(|e| panic!("{program} (e2fsprogs) is needed for this test: {e}"))
}

/// The disk: the guest appends numbered records to a file on an ext4
/// virtio-blk disk, fsyncs each and then reports it (SYNCEDn) on its
/// console. SIGKILL of the primary at a random moment; the standby writes
/// the held writes of the epochs it applied to the image, takes over and
/// appends on. Afterwards (the standby killed too) the file in the image
/// holds REC1..RECn with no gap or repeat, and n covers every record
/// either console reported as synced. Before the kill, the standby is
/// stopped (SIGSTOP) for 3 s: the raw image must hold no record past the
/// last reported (the overlay holds unacknowledged epochs' writes), and
/// the held records reach it once the standby continues.
#[test]
fn sigkill_of_the_primary_the_disk_holds_every_record_reported_synced() {
    let _turn = turn();
    let s = Scratch::new("fo-disk");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let image = s.blank("data.ext4", 64 << 20);
    let o = tool("mkfs.ext4", &["-q", "-F", &image.display().to_string()]);
    assert!(o.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&o.stderr));
    let work = "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo MOUNTED && \
                i=0; while true; do i=$((i+1)); echo REC$i >> /mnt/recs && sync /mnt/recs && echo SYNCED$i; \
                sleep 0.05; done";
    launch(detached(&run_dir, "pri", "128M", work).args(["--disk", &disk_arg(&image, "")]));
    let url = format!("unix:{}", s.0.join("fo.sock").display());
    let o = runtime_cmd(&run_dir)
        .args(["run", "--detach", "--name", "sby", "--standby", &url])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_status(&run_dir, "sby", "waiting", Duration::from_secs(10));
    wait_line(&run_dir, "pri", "SYNCED3", Duration::from_secs(180));
    protect_with(&run_dir, &url, HOLD_TIMEOUT_MS);
    let at_protect = last_synced(&console_log(&run_dir, "pri"));
    // Records go on being synced and reported while protected.
    wait_line(
        &run_dir,
        "pri",
        &format!("SYNCED{}", at_protect + 5),
        Duration::from_secs(60),
    );
    // The standby stopped, no epoch is acknowledged: the guest goes on
    // writing and syncing records, but none of them reaches the image.
    // Released output (SYNCEDn-1 is printed before RECn is written, and an
    // epoch's output is released before its writes are committed) bounds
    // what the image may hold: at most one record past the last reported.
    signal_standby(&run_dir, libc::SIGSTOP);
    std::thread::sleep(ACKS_STOPPED);
    let in_image = highest_record_in(&image);
    let reported = last_synced(&console_log(&run_dir, "pri"));
    let held = failover(&run_dir, "pri");
    signal_standby(&run_dir, libc::SIGCONT);
    assert!(
        in_image <= reported + 1,
        "the image holds REC{in_image} while the standby acknowledged nothing and the primary \
         reported only SYNCED{reported}: writes of unacknowledged epochs reached the image"
    );
    assert!(
        held["disk_held_bytes"].as_u64().unwrap_or(0) > 0,
        "the guest wrote nothing while the standby was stopped: {held}"
    );
    // Acknowledged again: the held records reach the image.
    wait_line(
        &run_dir,
        "pri",
        &format!("SYNCED{}", reported + 5),
        Duration::from_secs(60),
    );
    let resumed = last_synced(&console_log(&run_dir, "pri"));
    let start = Instant::now();
    while highest_record_in(&image) < resumed {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SYNCED{resumed} was released but the image holds only REC{}",
            highest_record_in(&image)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "acks stopped: REC{in_image} in the image, SYNCED{reported} reported, {} bytes held; \
         resumed: REC{resumed} in the image",
        held["disk_held_bytes"]
    );
    std::thread::sleep(Duration::from_millis(random_below(2000)));
    sigkill(&run_dir, "pri");
    let f = wait_status(&run_dir, "sby", "took-over", Duration::from_secs(30));
    eprintln!("took over: {f}");
    let primary = console_log(&run_dir, "pri");
    let pri_last = last_synced(&primary);
    wait_line(
        &run_dir,
        "sby",
        &format!("SYNCED{}", pri_last + 10),
        Duration::from_secs(60),
    );
    let sby_pid = vm_pid(&run_dir, "sby");
    sigkill(&run_dir, "sby");
    // Until its files are closed (a dead process's, before it is reaped).
    let start = Instant::now();
    while std::fs::read_dir(format!("/proc/{sby_pid}/fd")).is_ok_and(|mut d| d.next().is_some()) {
        assert!(start.elapsed() < Duration::from_secs(10), "the standby did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    let standby = console_log(&run_dir, "sby");
    let reported = pri_last.max(last_synced(&standby));
    // The image as the kernel left it (the guest's journal replayed on a
    // copy), then the file.
    let copy = s.0.join("check.ext4");
    std::fs::copy(&image, &copy).unwrap();
    let copy = copy.display().to_string();
    let fsck = tool("e2fsck", &["-fy", &copy]);
    assert!(
        fsck.status.code().is_some_and(|c| c <= 1),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let cat = tool("debugfs", &["-R", "cat /recs", &copy]);
    assert!(
        cat.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&cat.stderr)
    );
    let recs: Vec<u64> = String::from_utf8_lossy(&cat.stdout)
        .lines()
        .map(|l| {
            l.trim()
                .strip_prefix("REC")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("a bad record {l:?}"))
        })
        .collect();
    let want: Vec<u64> = (1..=recs.len() as u64).collect();
    assert_eq!(recs, want, "records lost, repeated or out of order");
    eprintln!(
        "records: {at_protect} synced when protected, {pri_last} reported by the primary, {reported} in all reported, {} in the image",
        recs.len()
    );
    assert!(
        recs.len() as u64 >= reported,
        "the image holds {} records, but SYNCED{reported} was reported\n{primary}\n---\n{standby}",
        recs.len()
    );
}
