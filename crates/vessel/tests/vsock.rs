//! virtio-vsock end to end: the real `vessel` binary, the real guest
//! kernel's vsock driver, and a guest program that uses AF_VSOCK directly
//! (`vessel-agent echo` and `vessel-agent connect` in the test initramfs).
//! Engine: emu.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{artifact, guest, Scratch, Watchdog};

/// The agent must be in the initramfs (guest/build-initramfs.sh puts it
/// there); an old cached initramfs without it fails here, by name.
fn require_agent() {
    let cpio = std::fs::read(artifact("initramfs.cpio")).unwrap();
    assert!(
        cpio.windows(16).any(|w| w == b"bin/vessel-agent"),
        "the cached initramfs has no /bin/vessel-agent: run guest/build-initramfs.sh (scripts/test-all does)"
    );
}

/// Connect to the guest's port through the hybrid socket: `CONNECT`,
/// then `OK <hostport>`. Retries while the guest's listener is not up yet
/// (the host socket is closed then).
fn connect_guest(uds: &Path, port: u32, deadline: Instant) -> UnixStream {
    loop {
        let mut s = UnixStream::connect(uds).expect("connect to uds_path");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while let Ok(1) = s.read(&mut b) {
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        if let Some(p) = line.strip_prefix("OK ") {
            assert!(p.parse::<u32>().is_ok(), "bad OK line {line:?}");
            return s;
        }
        assert!(line.is_empty(), "unexpected answer {line:?}");
        assert!(
            Instant::now() < deadline,
            "the guest never listened on vsock port {port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One boot exercises both directions:
/// - guest to host: `vessel-agent connect 2 5000`, once and eight at a
///   time, reaches the host listener at `<uds>_5000`; a port with no
///   listener gives the guest "connection reset";
/// - host to guest: 24 parallel connections to the guest's echo server,
///   each moving 96 KiB both ways (more than one credit window);
///
/// Then the guest waits for the host's all-clear on port 5001.
#[test]
fn vsock_both_ways_with_a_real_guest() {
    require_agent();
    let dir = Scratch::new("vsock-e2e");
    let uds = dir.0.join("v.sock");
    let l5000 = UnixListener::bind(dir.0.join("v.sock_5000")).unwrap();
    let l5001 = UnixListener::bind(dir.0.join("v.sock_5001")).unwrap();
    // The host's side of port 5000: read the guest's line, answer it.
    std::thread::spawn(move || {
        for s in l5000.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let _ = writeln!(s, "host-got:{}", line.trim());
            });
        }
    });
    let cmd = "vessel-agent echo 7000 & \
               echo guest-hello | vessel-agent connect 2 5000; \
               for i in 1 2 3 4 5 6 7 8; do echo par-$i | vessel-agent connect 2 5000 > /tmp/o$i & done; \
               for i in 1 2 3 4 5 6 7 8; do while [ ! -s /tmp/o$i ]; do sleep 0.1; done; done; cat /tmp/o*; \
               vessel-agent connect 2 5999 </dev/null; echo no-listener-exit=$?; \
               echo HOST-TURN; vessel-agent connect 2 5001 </dev/null";
    let mut child = guest(cmd, "reboot")
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _dog = Watchdog::new(&child);
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // Wait for the guest's turn to end.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the guest never got to HOST-TURN");
        if line.contains("HOST-TURN") {
            break;
        }
    }
    // Host to guest, 24 connections at once.
    let threads: Vec<_> = (0..24u32)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let s = connect_guest(&uds, 7000, Instant::now() + Duration::from_secs(120));
                let data: Vec<u8> = (0..96 * 1024u32).map(|j| (j.wrapping_mul(31) ^ i) as u8).collect();
                let mut w = s.try_clone().unwrap();
                let expected = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&data).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                (&s).read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                assert!(
                    back == expected,
                    "connection {i}: echo differs ({} bytes back)",
                    back.len()
                );
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a host-to-guest connection failed");
    }
    // A port nobody listens on in the guest: the host socket is closed.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    writeln!(s, "CONNECT 7999").unwrap();
    let mut b = [0u8; 16];
    assert_eq!(
        s.read(&mut b).unwrap(),
        0,
        "no guest listener: the host socket must close"
    );
    // All clear: the guest ends.
    let (mut bye, _) = l5001.accept().unwrap();
    bye.write_all(b"bye\n").unwrap();
    drop(bye);
    let status = child.wait().unwrap();
    let all = reader.join().unwrap();
    assert!(status.success(), "vessel exited with {status:?}:\n{all}");
    assert!(all.contains("host-got:guest-hello"), "{all}");
    for i in 1..=8 {
        assert!(all.contains(&format!("host-got:par-{i}")), "par-{i} missing:\n{all}");
    }
    assert!(all.contains("no-listener-exit=1"), "{all}");
    assert!(all.contains("VESSEL-CMD-EXIT=0"), "{all}");
    // The VMM removed its socket when it ended.
    assert!(!uds.exists(), "{} left behind", uds.display());
}

/// `vessel exec` with its scratch TMPDIR, under emu, on the test guest.
fn exec(tmp: &Path) -> std::process::Command {
    let mut c = common::vessel();
    c.env("TMPDIR", tmp)
        .args(["exec", "--accel", "emu", "--kernel"])
        .arg(artifact("kernel/vmlinux"))
        .arg("--initrd")
        .arg(artifact("initramfs.cpio.gz"));
    c
}

/// Nothing of a finished exec is left: no files in its TMPDIR, no process
/// that names it.
fn assert_nothing_left(tmp: &Path) {
    let left: Vec<_> = std::fs::read_dir(tmp).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let needle = tmp.to_string_lossy().into_owned();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            assert!(!cmd.contains(&needle), "process left behind: {cmd}");
        }
    }
}

fn run_with_stdin(mut c: std::process::Command, input: &[u8]) -> std::process::Output {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _dog = Watchdog::new(&child);
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let o = child.wait_with_output().unwrap();
    w.join().unwrap();
    o
}

/// `vessel exec -- CMD` in a throwaway VM: stdout and stderr apart, stdin,
/// environment and working directory in, the exit status out, a signal
/// passed on, the timeout enforced, and nothing left behind.
#[test]
fn exec_passes_streams_status_signals_and_timeout() {
    require_agent();
    let dir = Scratch::new("vsock-exec");
    let tmp = dir.0.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    let mut c = exec(&tmp);
    c.args(["-e", "GREETING=hello", "--cwd", "/etc", "--"]).args([
        "sh",
        "-c",
        "echo $GREETING from $(pwd); tr a-z A-Z; echo to-stderr >&2; exit 3",
    ]);
    let o = run_with_stdin(c, b"some input\n");
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(3), "stdout: {out}\nstderr: {err}");
    assert_eq!(out, "hello from /etc\nSOME INPUT\n");
    assert!(err.contains("to-stderr") && !out.contains("to-stderr"), "{err}");
    assert_nothing_left(&tmp);

    // A command that cannot start.
    let mut c = exec(&tmp);
    c.args(["--", "/no/such/program"]);
    let o = run_with_stdin(c, b"");
    assert_eq!(o.status.code(), Some(127), "{}", String::from_utf8_lossy(&o.stderr));
    assert_nothing_left(&tmp);

    // SIGTERM to `vessel exec` reaches the command.
    let mut c = exec(&tmp);
    c.args([
        "--",
        "sh",
        "-c",
        "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let _dog = Watchdog::new(&child);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(status.code(), Some(7));
    assert_nothing_left(&tmp);

    // --timeout kills the command: exit code 124.
    let start = Instant::now();
    let mut c = exec(&tmp);
    c.args(["--timeout", "3", "--", "sleep", "1000"]);
    let o = run_with_stdin(c, b"");
    assert_eq!(o.status.code(), Some(124), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("timed out"));
    assert!(start.elapsed() < Duration::from_secs(300));
    assert_nothing_left(&tmp);
}

/// A private cache for warm-start tests: the default guest's kernel and
/// initramfs (copies, so a test may touch them), and the snapshots
/// `vessel exec` takes.
fn private_cache(dir: &Path) -> std::path::PathBuf {
    let cache = dir.join("cache");
    std::fs::create_dir_all(cache.join("kernel")).unwrap();
    std::os::unix::fs::symlink(artifact("kernel/vmlinux"), cache.join("kernel/vmlinux")).unwrap();
    std::fs::copy(artifact("initramfs.cpio.gz"), cache.join("initramfs.cpio.gz")).unwrap();
    cache
}

/// `vessel exec` on the default guest of `cache` (warm start), under emu.
fn warm_exec(tmp: &Path, cache: &Path) -> std::process::Command {
    let mut c = common::vessel();
    c.env("TMPDIR", tmp)
        .env("VESSEL_CACHE", cache)
        .args(["exec", "--accel", "emu"]);
    c
}

/// The warm-start snapshots in `cache`.
fn snapshots(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(cache.join("exec-snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// A real guest restored from a snapshot answers `CONNECT` (it hung in
/// its transport-reset handler, reading the config space while the device
/// worker held its lock), and `vessel exec NAME` runs commands in a
/// running VM: the booted original, then its clone on its own socket
/// (`--vsock-uds`).
#[test]
fn restored_guest_answers_and_exec_runs_in_named_vms() {
    require_agent();
    let dir = Scratch::new("vsock-restore");
    let run_dir = dir.0.join("run");
    let _reaper = common::Reaper(run_dir.clone());
    let (a_sock, b_sock, snap) = (dir.0.join("a.sock"), dir.0.join("b.sock"), dir.0.join("snap"));
    common::launch(
        common::detached_with_cmdline(
            &run_dir,
            "orig",
            "kernel/vmlinux",
            "256M",
            "console=ttyS0 reboot=k panic=-1 quiet vessel.agent=1",
        )
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", a_sock.display())),
    );
    drop(connect_guest(&a_sock, 1024, Instant::now() + Duration::from_secs(600)));
    // `vessel exec NAME` in the booted VM.
    let mut c = common::runtime_cmd(&run_dir);
    c.args([
        "exec",
        "orig",
        "--",
        "sh",
        "-c",
        "echo in-orig > /tmp/mark; cat /tmp/mark; exit 5",
    ]);
    let o = run_with_stdin(c, b"");
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "in-orig\n");

    common::cli_ok(
        &run_dir,
        &["snapshot", "orig", snap.to_str().unwrap(), "--leave-paused"],
    );
    common::cli_ok(&run_dir, &["kill", "orig"]);
    common::launch(
        common::runtime_cmd(&run_dir)
            .args(["run", "--detach", "--name", "clone", "--restore"])
            .arg(&snap)
            .arg("--vsock-uds")
            .arg(&b_sock)
            .stdin(Stdio::null()),
    );
    // Answered within the retry window (it never was before the fix).
    let s = connect_guest(&b_sock, 1024, Instant::now() + Duration::from_secs(120));
    drop(s);
    let mut c = common::runtime_cmd(&run_dir);
    c.args(["exec", "clone", "--", "sh", "-c", "cat /tmp/mark; tr a-z A-Z"]);
    let o = run_with_stdin(c, b"restored\n");
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "in-orig\nRESTORED\n");

    // `vessel restore --count 2 --vsock-uds`: two more clones next to
    // the first, each on a socket of its own.
    let many = dir.0.join("{name}.sock");
    common::cli_ok(
        &run_dir,
        &[
            "restore",
            snap.to_str().unwrap(),
            "--name",
            "many",
            "--count",
            "2",
            "--vsock-uds",
            many.to_str().unwrap(),
        ],
    );
    for n in ["many-1", "many-2"] {
        let sock = dir.0.join(format!("{n}.sock"));
        drop(connect_guest(&sock, 1024, Instant::now() + Duration::from_secs(120)));
        let mut c = common::runtime_cmd(&run_dir);
        c.args(["exec", n, "--", "cat", "/tmp/mark"]);
        let o = run_with_stdin(c, b"");
        assert_eq!(o.status.code(), Some(0), "{n}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "in-orig\n", "{n}");
        common::cli_ok(&run_dir, &["kill", n]);
    }
    common::cli_ok(&run_dir, &["kill", "clone"]);
}

/// `vessel exec` with the default guest starts warm: the first run boots
/// the guest and snapshots it (once), the next ones are clones of that
/// snapshot. Clones share no writable state, stdin, stdout and the exit
/// status pass through, nothing is left behind, and a changed guest
/// gives a new snapshot in place of the stale one.
#[test]
fn exec_starts_warm_from_a_cached_snapshot() {
    require_agent();
    let dir = Scratch::new("vsock-warm");
    let tmp = dir.0.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let cache = private_cache(&dir.0);

    let mut c = warm_exec(&tmp, &cache);
    c.args(["--", "sh", "-c", "echo first > /tmp/mark; cat /tmp/mark"]);
    let o = run_with_stdin(c, b"");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "first\n");
    assert!(err.contains("taking a snapshot"), "{err}");
    let first = snapshots(&cache);
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].join("state").is_file() && first[0].join("memory").is_file());
    assert_nothing_left(&tmp);

    // Warm: no new snapshot, and the last clone's file is not here.
    let start = Instant::now();
    let mut c = warm_exec(&tmp, &cache);
    c.args([
        "--",
        "sh",
        "-c",
        "test ! -e /tmp/mark || echo shared; tr a-z A-Z; exit 4",
    ]);
    let o = run_with_stdin(c, b"warm\n");
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "WARM\n");
    assert!(!err.contains("taking a snapshot"), "{err}");
    assert_eq!(snapshots(&cache), first);
    eprintln!("warm exec (emu): {took:?}");
    assert!(took < Duration::from_secs(120), "{took:?}");
    assert_nothing_left(&tmp);

    // A changed guest: a new snapshot replaces the stale one.
    let initrd = cache.join("initramfs.cpio.gz");
    let f = std::fs::OpenOptions::new().write(true).open(&initrd).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);
    let mut c = warm_exec(&tmp, &cache);
    c.args(["--", "true"]);
    let o = run_with_stdin(c, b"");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("taking a snapshot"), "{err}");
    let second = snapshots(&cache);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first);
    assert_nothing_left(&tmp);
}

/// Twenty `vessel exec` at once (warm starts from one snapshot, which
/// the first of them takes while the others wait) all succeed and leave
/// no processes, sockets or files behind.
#[test]
fn twenty_parallel_execs() {
    require_agent();
    let dir = Scratch::new("vsock-exec20");
    let tmp = dir.0.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let cache = private_cache(&dir.0);
    let runs: Vec<_> = (0..20)
        .map(|i| {
            let mut c = warm_exec(&tmp, &cache);
            c.args(["--", "sh", "-c", &format!("echo run-{i}; exit {}", i % 5)]);
            std::thread::spawn(move || (i, run_with_stdin(c, b"")))
        })
        .collect();
    for r in runs {
        let (i, o) = r.join().unwrap();
        assert_eq!(o.status.code(), Some(i % 5), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("run-{i}\n"));
    }
    assert_eq!(snapshots(&cache).len(), 1);
    assert_nothing_left(&tmp);
}

/// The one VMM (`vessel run`, directly or through the jailer) that the
/// `vessel exec` with pid `exec` started, with its command line; `what`
/// names the case in the failure message.
fn vmm_of(exec: u32, what: &str) -> (u32, String) {
    let vmms: Vec<_> = children_of(exec)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(" run "))
        .collect();
    assert_eq!(vmms.len(), 1, "{what}: {vmms:?}");
    vmms.into_iter().next().unwrap()
}

/// The processes whose parent is `pid`, with their command lines.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            v.push((child, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    v
}

fn cgroup2_mount() -> std::path::PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).unwrap().into())
        })
        .expect("this test needs a cgroup v2 hierarchy mounted")
}

fn status_line(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// As root, `vessel exec` runs its VMM in the jail, warm (the snapshot's
/// files linked in) and cold (kernel and initramfs linked in): output and
/// status pass through; while the command runs, the VMM is chrooted (its
/// root holds the jail's few files, not the host's), runs as uid and gid
/// 65534 in a new PID namespace and its own cgroup; afterwards no jail
/// directory, cgroup, process or socket is left. `--no-jail` runs it
/// as before.
#[test]
fn exec_runs_the_vm_in_the_jail_and_leaves_nothing() {
    require_agent();
    // SAFETY: geteuid has no arguments.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root: it builds the jail");
    let dir = Scratch::new("vsock-jail");
    let tmp = dir.0.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let cache = private_cache(&dir.0);
    for (how, jailed) in [("warm", true), ("cold", true), ("no-jail", false)] {
        let mut c = match how {
            "cold" => exec(&tmp),
            _ => warm_exec(&tmp, &cache),
        };
        c.env("VESSEL_CACHE", &cache);
        if !jailed {
            c.arg("--no-jail");
        }
        c.args(["--", "sh", "-c", "echo in-vm; sleep 3; echo bye >&2; exit 5"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let _dog = Watchdog::new(&child);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "in-vm\n", "{how}");
        let (vmm, cmd) = &vmm_of(child.id(), how);
        let root: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/root"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let cgroup = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
        if jailed {
            assert_eq!(status_line(*vmm, "Uid"), "65534 65534 65534 65534", "{how}");
            assert_eq!(status_line(*vmm, "Gid"), "65534 65534 65534 65534", "{how}");
            assert_eq!(status_line(*vmm, "CapEff"), "0000000000000000", "{how}");
            assert!(
                status_line(*vmm, "NSpid").ends_with(" 1"),
                "{how}: not pid 1 of a new PID namespace"
            );
            assert!(root.contains(&"v.sock".to_string()), "{how}: jail root {root:?}");
            assert!(
                !root.iter().any(|f| f == "etc" || f == "usr" || f == "root"),
                "{how}: {root:?}"
            );
            let kernel_or_snapshot = if how == "warm" { "snapshot" } else { "vmlinux" };
            assert!(root.contains(&kernel_or_snapshot.to_string()), "{how}: {root:?}");
            assert!(cgroup.contains("0::/exec-"), "{how}: {cgroup}");
            assert!(cmd.starts_with("vessel run "), "{how}: {cmd}");
        } else {
            assert_eq!(status_line(*vmm, "Uid"), "0 0 0 0", "{how}");
            assert!(root.contains(&"etc".to_string()), "{how}: {root:?}");
        }
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(5), "{how}: {err}");
        assert_eq!(rest, "", "{how}");
        assert!(err.contains("bye"), "{how}: {err}");
        assert_nothing_left(&tmp);
        assert!(!Path::new(&format!("/proc/{vmm}")).exists(), "{how}: VMM {vmm} left");
        let jails: Vec<_> = std::fs::read_dir(cache.join("jail/vessel"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(jails.is_empty(), "{how}: jails left: {jails:?}");
        if let Some(cg) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) {
            if jailed {
                let dir = cgroup2_mount().join(cg.trim_start_matches('/'));
                assert!(!dir.exists(), "{how}: cgroup {} left", dir.display());
            }
        }
        if how == "warm" {
            // The snapshot was taken in the jail too (its VMM saw the
            // kernel as /vmlinux), and it is root's, not writable by the
            // jailed uid of the clones that get links to it.
            use std::os::unix::fs::MetadataExt;
            let snap = &snapshots(&cache)[0];
            let state = String::from_utf8_lossy(&std::fs::read(snap.join("state")).unwrap()).into_owned();
            assert!(
                state.contains(r#""kernel":"/vmlinux""#),
                "snapshot not taken in the jail"
            );
            for f in ["state", "memory"] {
                let m = std::fs::metadata(snap.join(f)).unwrap();
                assert_eq!((m.uid(), m.gid(), m.mode() & 0o022), (0, 0, 0), "{f}");
            }
        }
    }
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

/// A `vessel exec` killed with SIGKILL in the middle of its command
/// cannot clean up after itself, yet within a few seconds nothing of its
/// VM is left: no VMM (or jailer) process, no jail directory, socket or
/// cgroup, no file in its TMPDIR. Jailed (the VMM runs under the jailer,
/// in a new PID namespace, as another uid, so PR_SET_PDEATHSIG set on the
/// jailer does not reach it) and with `--no-jail`.
#[test]
fn a_killed_exec_leaves_nothing_behind() {
    require_agent();
    // SAFETY: geteuid has no arguments.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root: it builds the jail");
    let dir = Scratch::new("vsock-killed");
    let tmp = dir.0.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let cache = private_cache(&dir.0);
    for jailed in [true, false] {
        let mut c = warm_exec(&tmp, &cache);
        if !jailed {
            c.arg("--no-jail");
        }
        c.args(["--", "sh", "-c", "echo in-vm; sleep 60"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        let _dog = Watchdog::new(&child);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "in-vm\n", "jailed {jailed}");
        let vmm = vmm_of(child.id(), &format!("jailed {jailed}")).0;
        let cgroup = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
        let jail_dirs = || -> Vec<std::path::PathBuf> {
            std::fs::read_dir(cache.join("jail/vessel"))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        assert_eq!(jail_dirs().len(), usize::from(jailed), "jailed {jailed}");
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let cgroup_dir = cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .filter(|_| jailed)
            .map(|cg| cgroup2_mount().join(cg.trim_start_matches('/')));
        let left = || {
            let mut left = Vec::new();
            if !gone(vmm) {
                left.push(format!("VMM {vmm}"));
            }
            left.extend(jail_dirs().into_iter().map(|p| p.display().to_string()));
            left.extend(
                std::fs::read_dir(&tmp)
                    .unwrap()
                    .flatten()
                    .map(|e| e.path().display().to_string()),
            );
            if let Some(d) = cgroup_dir.as_ref().filter(|d| d.exists()) {
                left.push(d.display().to_string());
            }
            left
        };
        while !left().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            left().is_empty(),
            "jailed {jailed}: left 5 s after SIGKILL: {:?}",
            left()
        );
    }
}

/// As root, `vessel exec --disk` runs jailed too: a read-only disk (the
/// default) is put into the jail as `/disk0`, the guest reads it, the VMM
/// runs as uid 65534 with `disk0` in its root, and nothing is left. A
/// writable disk (readonly=off) cannot be the jail's (the jailed uid would
/// have to own the user's image): that VM runs unjailed, says so, and the
/// guest's write lands in the image.
#[test]
fn exec_with_a_disk_runs_in_the_jail_when_read_only() {
    require_agent();
    // SAFETY: geteuid has no arguments.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root: it builds the jail");
    let dir = Scratch::new("vsock-disk-jail");
    let tmp = dir.0.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let cache = private_cache(&dir.0);
    let img = dir.0.join("disk.img");
    let mut data = b"disk-content-xyz".to_vec();
    data.resize(1 << 20, 0);
    std::fs::write(&img, &data).unwrap();
    for (spec, jailed) in [
        (format!("path={}", img.display()), true),
        (format!("path={},readonly=off", img.display()), false),
    ] {
        let mut c = exec(&tmp);
        c.env("VESSEL_CACHE", &cache)
            .arg("--disk")
            .arg(&spec)
            .args([
                "--",
                "sh",
                "-c",
                "echo got=$(dd if=/dev/vda bs=16 count=1 2>/dev/null); \
                 echo written-by-guest | dd of=/dev/vda bs=16 count=1 conv=fsync 2>/dev/null; echo wrote=$?; sleep 2",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let _dog = Watchdog::new(&child);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut got = String::new();
        out.read_line(&mut got).unwrap();
        assert_eq!(got, "got=disk-content-xyz\n", "{spec}");
        let vmm = vmm_of(child.id(), &spec).0;
        let root: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/root"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let uid = status_line(vmm, "Uid");
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(child.wait().unwrap().success(), "{spec}: {err}");
        let written = std::fs::read(&img).unwrap();
        if jailed {
            assert_eq!(uid, "65534 65534 65534 65534", "{spec}");
            assert!(root.contains(&"disk0".to_string()), "{spec}: {root:?}");
            assert!(!root.contains(&"etc".to_string()), "{spec}: {root:?}");
            assert!(!err.contains("unjailed"), "{spec}: {err}");
            assert_ne!(rest, "wrote=0\n", "{spec}: a read-only disk took a write");
            assert_eq!(&written[..16], b"disk-content-xyz", "{spec}");
        } else {
            assert_eq!(uid, "0 0 0 0", "{spec}");
            assert!(err.contains("running the VM unjailed"), "{spec}: {err}");
            assert_eq!(rest, "wrote=0\n", "{spec}");
            assert_eq!(&written[..16], b"written-by-guest", "{spec}");
        }
        assert_nothing_left(&tmp);
        let jails: Vec<_> = std::fs::read_dir(cache.join("jail/vessel"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(jails.is_empty(), "{spec}: jails left: {jails:?}");
    }
}
