//! `vessel jail` end to end (emu engine): a jailed Vessel boots the test
//! guest, configured over its API socket inside the jail from outside, and
//! runs as the uid with no capability, no_new_privs, seccomp, in its
//! cgroup with the limits, and without a view of the host's files. Also
//! `vessel run` as an unprivileged user. Both need root to set up.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;

fn curl(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, &format!("http://localhost{path}"), "-w", "\n%{http_code}"])
        .args(["-H", "Content-Type: application/json", "-d", body])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in info.lines() {
        let (left, right) = line.split_once(" - ").unwrap();
        if right.starts_with("cgroup2 ") {
            return PathBuf::from(left.split_whitespace().nth(4).unwrap());
        }
    }
    panic!("this test needs a cgroup v2 hierarchy mounted");
}

fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Waits for `marker` on the child's stdout; everything read so far.
fn wait_stdout(lines: &std::sync::mpsc::Receiver<String>, marker: &str, timeout: Duration) -> String {
    let start = Instant::now();
    let mut out = String::new();
    while !out.contains(marker) {
        let left = timeout.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(l) => {
                out.push_str(&l);
                out.push('\n');
            }
            Err(_) => panic!("no {marker:?} in the guest's output:\n{out}"),
        }
    }
    out
}

fn spawn_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn jailed_vessel_boots_and_is_confined() {
    let s = Scratch::new("jail");
    let id = format!("jt{}", std::process::id());
    let root = s.0.join("vessel").join(&id).join("root");
    // The orchestrator puts the kernel and initrd in the jail first.
    std::fs::create_dir_all(&root).unwrap();
    for (from, to) in [("kernel/vmlinux", "vmlinux"), ("initramfs.cpio.gz", "initrd")] {
        std::fs::copy(artifact(from), root.join(to)).unwrap();
    }
    let parent_cgroup = format!("vessel-jail-test-{}", std::process::id());
    let mut child = KillOnDrop(
        vessel()
            .args(["jail", "--id", &id, "--exec-file", env!("CARGO_BIN_EXE_vessel")])
            .args(["--uid", &NOBODY.to_string(), "--gid", &NOBODY.to_string()])
            .arg("--chroot-base-dir")
            .arg(&s.0)
            .args(["--cgroup-version", "2", "--parent-cgroup", &parent_cgroup])
            .args(["--cgroup", "cgroup.max.descendants=0", "--cgroup", "cgroup.max.depth=0"])
            .args([
                "--resource-limit",
                "no-file=512",
                "--resource-limit",
                "fsize=1073741824",
            ])
            .args(["--", "run", "--api-sock", "/api.sock"])
            .env("SECRET_HOST_VARIABLE", "must-not-reach-the-vmm")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let lines = spawn_lines(&mut child.0);
    let sock = root.join("api.sock");
    let start = Instant::now();
    while !sock.exists() {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!("the jailed Vessel ended before its API came up: {st}");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no API socket in the jail");
        std::thread::sleep(Duration::from_millis(50));
    }
    let boot_args = format!(
        "console=ttyS0 reboot=k panic=-1 vessel.end=reboot vessel.cmd={}",
        b64("echo JAILED-GUEST-UP; sleep 600")
    );
    let (code, body) = curl(
        &sock,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path":"/vmlinux","initrd_path":"/initrd","boot_args":"{boot_args}"}}"#),
    );
    assert_eq!(code, 204, "{body}");
    let (code, body) = curl(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":128,"accel":"emu"}"#,
    );
    assert_eq!(code, 204, "{body}");
    let (code, body) = curl(&sock, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(code, 204, "{body}");
    wait_stdout(&lines, "JAILED-GUEST-UP", Duration::from_secs(120));

    // Its credentials and filters.
    let uid = status_field(pid, "Uid");
    assert!(uid.split_whitespace().all(|u| u == "65534"), "Uid {uid}");
    let gid = status_field(pid, "Gid");
    assert!(gid.split_whitespace().all(|g| g == "65534"), "Gid {gid}");
    assert_eq!(status_field(pid, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.is_empty(), "the environment reached the VMM: {environ:?}");

    // Its cgroup and limits.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("0::/{parent_cgroup}/{id}");
    assert!(cg.lines().any(|l| l == want), "{cg}");
    let dir = cgroup2_mount().join(&parent_cgroup).join(&id);
    assert_eq!(
        std::fs::read_to_string(dir.join("cgroup.max.descendants"))
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("cgroup.max.depth")).unwrap().trim(),
        "0"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 512 ")),
        "{limits}"
    );
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max file size") && l.contains(" 1073741824 ")),
        "{limits}"
    );

    // What it can see: the jail, not the host.
    let proot = PathBuf::from(format!("/proc/{pid}/root"));
    let mut seen: Vec<String> = std::fs::read_dir(&proot)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    for host_only in ["etc", "proc", "home", "root", "sys", "tmp", "work", "usr/bin"] {
        assert!(
            !proot.join(host_only).exists(),
            "/{host_only} is visible in the jail: {seen:?}"
        );
    }
    for entry in &seen {
        assert!(
            ["vessel", "vmlinux", "initrd", "api.sock", "dev", "lib", "lib64", "usr"].contains(&entry.as_str()),
            "unexpected {entry} in the jail: {seen:?}"
        );
    }
    let mut devs: Vec<String> = std::fs::read_dir(proot.join("dev"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    let mut expected = vec!["net".to_string(), "urandom".to_string()];
    if Path::new("/dev/kvm").exists() {
        expected.insert(0, "kvm".into());
    }
    assert_eq!(devs, expected);
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert_eq!(mounts.lines().count(), 1, "mounts in the jail:\n{mounts}");

    // The API still drives it from outside: pause and resume.
    let (code, body) = curl(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    assert_eq!(code, 204, "{body}");
    let (code, body) = curl(&sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    assert_eq!(code, 204, "{body}");
    drop(child);
    let _ = std::fs::remove_dir(&dir);
    let _ = std::fs::remove_dir(cgroup2_mount().join(&parent_cgroup));
}

/// `vessel run` started by a non-root user with no capability boots an
/// emu guest.
#[test]
fn unprivileged_run_boots_an_emu_guest() {
    let s = Scratch::new("unpriv");
    // Files nobody can read: copies of the guest, in a directory it owns.
    let dir = s.0.join("files");
    std::fs::create_dir(&dir).unwrap();
    for (from, to) in [("kernel/vmlinux", "vmlinux"), ("initramfs.cpio.gz", "initrd")] {
        std::fs::copy(artifact(from), dir.join(to)).unwrap();
    }
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    std::os::unix::fs::chown(&s.0, Some(NOBODY), Some(NOBODY)).unwrap();
    let cmd = "echo UNPRIVILEGED-GUEST-UP";
    let o = Command::new("setpriv")
        .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"])
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "--accel", "emu", "--mem", "128M", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initrd"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 vessel.end=reboot vessel.cmd={}",
            b64(cmd)
        ))
        .env("HOME", &dir)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .timed_output()
        .expect("setpriv (util-linux)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "status {}: {}\n{out}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("UNPRIVILEGED-GUEST-UP"), "{out}");
}

/// Started as `jailer` with --new-pid-ns and --daemonize: the VMM is pid 1
/// of its namespace (its host pid in `<jail>/vessel.pid`), its stdio is
/// /dev/null, and it serves its API from the jail.
#[test]
fn jailer_argv0_new_pid_ns_and_daemonize() {
    let s = Scratch::new("jailer-pidns");
    let link = s.0.join("jailer");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vessel"), &link).unwrap();
    let id = format!("pn{}", std::process::id());
    let o = Command::new(&link)
        .args(["--id", &id, "--exec-file", env!("CARGO_BIN_EXE_vessel")])
        .args(["--uid", "65534", "--gid", "65534", "--chroot-base-dir"])
        .arg(&s.0)
        .args(["--parent-cgroup", &format!("vessel-jail-test-{id}")])
        .args(["--new-pid-ns", "--daemonize", "--", "run", "--api-sock", "/api.sock"])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root = s.0.join("vessel").join(&id).join("root");
    let start = Instant::now();
    while !root.join("api.sock").exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no API socket in the jail");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid: u32 = std::fs::read_to_string(root.join("vessel.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the VMM this test started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _kill = Kill(pid);
    let nspid = status_field(pid, "NSpid");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid {nspid}");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"), "fd {fd}");
    }
    let (code, body) = curl(&root.join("api.sock"), "GET", "/", "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"pid\":1"), "{body}");
}

/// The cgroup v1 hierarchy that holds `controller` (this host runs
/// systemd's hybrid mode: cpu exists only in v1).
fn cgroup1_mount(controller: &str) -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in info.lines() {
        let (left, right) = line.split_once(" - ").unwrap();
        let mut right = right.split_whitespace();
        if right.next() == Some("cgroup") && right.nth(1).is_some_and(|o| o.split(',').any(|o| o == controller)) {
            return PathBuf::from(left.split_whitespace().nth(4).unwrap());
        }
    }
    panic!("this test needs the {controller} controller in a cgroup v1 hierarchy");
}

/// CPU seconds `pid` has used (user + system), from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the comm.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// QoS: a guest spinning both its vCPUs inside a jail whose cgroup then
/// allows a tenth of a core (`--cgroup-version 1`, `cpu.cfs_quota_us`) is held to
/// it: the cgroup reports throttling, and the VMM's CPU use stays near the
/// quota (a generous bound: the host's load can only lower it; the quota is
/// small so that even a loaded host leaves the VM more than it). The
/// slowdown of a neighbour is measured by `bench/src/bin/qos.rs`.
#[test]
fn a_cpu_quota_holds_a_spinning_guest_down() {
    let s = Scratch::new("qos");
    let id = format!("qos{}", std::process::id());
    let root = s.0.join("vessel").join(&id).join("root");
    std::fs::create_dir_all(&root).unwrap();
    for (from, to) in [("kernel/vmlinux", "vmlinux"), ("initramfs.cpio.gz", "initrd")] {
        std::fs::copy(artifact(from), root.join(to)).unwrap();
    }
    let parent_cgroup = format!("vessel-qos-test-{}", std::process::id());
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 vessel.end=reboot vessel.cmd={}",
        b64("(while :; do :; done) & echo SPINNING; while :; do :; done")
    );
    let mut child = KillOnDrop(
        vessel()
            .args(["jail", "--id", &id, "--exec-file", env!("CARGO_BIN_EXE_vessel")])
            .args(["--uid", &NOBODY.to_string(), "--gid", &NOBODY.to_string()])
            .arg("--chroot-base-dir")
            .arg(&s.0)
            .args(["--cgroup-version", "1", "--parent-cgroup", &parent_cgroup])
            .args([
                "--cgroup",
                "cpu.cfs_period_us=100000",
                "--cgroup",
                "cpu.cfs_quota_us=10000",
            ])
            .args(["--", "run", "--accel", "emu", "--cpus", "2", "--mem", "128M"])
            .args(["--kernel", "/vmlinux", "--initrd", "/initrd", "--cmdline", &cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let lines = spawn_lines(&mut child.0);
    wait_stdout(&lines, "SPINNING", Duration::from_secs(240));
    let dir = cgroup1_mount("cpu").join(&parent_cgroup).join(&id);
    let tasks = std::fs::read_to_string(dir.join("tasks")).unwrap();
    assert!(
        tasks.lines().any(|t| t == pid.to_string()),
        "the VMM is not in {}",
        dir.display()
    );
    let before = cpu_seconds(pid);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let cores = (cpu_seconds(pid) - before) / start.elapsed().as_secs_f64();
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap();
    let throttled: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    drop(child);
    let _ = std::fs::remove_dir(&dir);
    let _ = std::fs::remove_dir(cgroup1_mount("cpu").join(&parent_cgroup));
    assert!(
        throttled > 0,
        "the cgroup never throttled the spinning VM ({cores:.2} cores):\n{stat}"
    );
    assert!(cores < 0.2, "a VM held to a tenth of a core used {cores:.2} cores");
}
