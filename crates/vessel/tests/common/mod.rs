//! Helpers shared by the end-to-end tests: where the guest artifacts are,
//! how to start the real `vessel` binary, and how to read its output.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

pub fn cache() -> PathBuf {
    std::env::var_os("VESSEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel"))
}

pub fn artifact(rel: &str) -> PathBuf {
    let p = cache().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run guest/build-all.sh first (scripts/test-all does)",
        p.display()
    );
    p
}

pub fn vessel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
}

pub fn b64(s: &str) -> String {
    b64_bytes(s.as_bytes())
}

/// Base64 of any bytes (guest commands and planted sectors).
pub fn b64_bytes(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `vessel` with named VMs kept in `run_dir` (VESSEL_RUNTIME_DIR).
pub fn runtime_cmd(run_dir: &std::path::Path) -> Command {
    let mut c = vessel();
    c.env("VESSEL_RUNTIME_DIR", run_dir);
    c
}

/// Kills every VM left in a runtime directory when a test ends (a failed
/// test must not leave detached guests running).
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(&self.0) else { return };
        for e in rd.flatten() {
            if let Some(pid) = std::fs::read_to_string(e.path().join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a VM process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn assert_clean_run(o: &Output) {
    assert!(
        o.status.success(),
        "vessel exited with {:?}\nstderr: {}\nstdout tail: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        stdout(o).lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    let s = stdout(o);
    assert!(s.contains("VESSEL-GUEST-READY"), "no marker in:\n{s}");
    assert!(s.contains("VESSEL-CMD-EXIT=0"), "command failed:\n{s}");
}

/// A `vessel run` of the minimal guest that runs `cmd` and ends with `end`
/// (reboot, poweroff, halt); add device flags before spawning it.
pub fn guest(cmd: &str, end: &str) -> Command {
    guest_on("kernel/vmlinux", 1, "256M", cmd, end)
}

/// The same with another kernel from the cache, vCPU count and memory.
pub fn guest_on(kernel: &str, cpus: u32, mem: &str, cmd: &str, end: &str) -> Command {
    let mut c = vessel();
    c.args(["run", "--accel", "emu", "--mem", mem, "--cpus", &cpus.to_string()])
        .arg("--kernel")
        .arg(artifact(kernel))
        .arg("--initrd")
        .arg(artifact("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 vessel.end={end} vessel.cmd={}",
            b64(cmd)
        ))
        .stdin(Stdio::null());
    c
}

/// A scratch directory for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vessel-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }

    /// A sparse blank file of `size` bytes.
    pub fn blank(&self, name: &str, size: u64) -> PathBuf {
        let p = self.0.join(name);
        let f = std::fs::File::create(&p).expect("create image");
        f.set_len(size).expect("size image");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--disk` for `path` with options.
pub fn disk_arg(path: &std::path::Path, opts: &str) -> String {
    if opts.is_empty() {
        format!("path={}", path.display())
    } else {
        format!("path={},{opts}", path.display())
    }
}

/// How long one VM run may take in a test before it counts as hung. A
/// guest that hangs must fail its test, not stall the whole CI run.
pub const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// `Command::output` with a deadline: on timeout the child is killed and
/// the test panics with what it printed so far.
pub mod netns;

pub trait TimedOutput {
    fn timed_output(&mut self) -> std::io::Result<Output>;
}

impl TimedOutput for Command {
    fn timed_output(&mut self) -> std::io::Result<Output> {
        use std::io::Read;
        let mut child = self.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let mut out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let out_reader = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = out.read_to_end(&mut b);
            b
        });
        let err_reader = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            b
        });
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() > RUN_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_reader.join().unwrap_or_default();
                panic!(
                    "timed out after {RUN_TIMEOUT:?}: {:?}\nlast output:\n{}",
                    self.get_program(),
                    String::from_utf8_lossy(&stdout)
                        .lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        Ok(Output {
            status,
            stdout: out_reader.join().unwrap_or_default(),
            stderr: err_reader.join().unwrap_or_default(),
        })
    }
}

/// For tests that read a running child's output line by line: SIGKILL the
/// child if it outlives [`RUN_TIMEOUT`], so the reader sees EOF and the
/// test fails instead of hanging. Disarmed when dropped.
pub struct Watchdog(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Watchdog {
    pub fn new(child: &std::process::Child) -> Watchdog {
        use std::sync::atomic::Ordering;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let pid = child.id() as libc::pid_t;
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while !flag.load(Ordering::Acquire) {
                if start.elapsed() > RUN_TIMEOUT {
                    eprintln!("watchdog: killing pid {pid} after {RUN_TIMEOUT:?}");
                    // SAFETY: kill(2) with a pid and a signal number; it
                    // touches no memory of ours.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The kernel command line of a test guest that runs `cmd` (the test
/// initramfs decodes `vessel.cmd`).
pub fn boot_args(cmd: &str) -> String {
    format!("console=ttyS0 reboot=k panic=-1 no_timer_check vessel.cmd={}", b64(cmd))
}

/// `vessel run --detach --name NAME` of the test guest on `kernel` (a
/// cache path such as `kernel/vmlinux`) with `mem`, under emu, running
/// `cmd`; add arguments (`--cpus`, `--disk`, ...) and pass it to [`launch`].
pub fn detached_on(run_dir: &std::path::Path, name: &str, kernel: &str, mem: &str, cmd: &str) -> Command {
    detached_with_cmdline(run_dir, name, kernel, mem, &boot_args(cmd))
}

/// [`detached_on`] with a whole kernel command line of the caller's.
pub fn detached_with_cmdline(run_dir: &std::path::Path, name: &str, kernel: &str, mem: &str, cmdline: &str) -> Command {
    let mut c = runtime_cmd(run_dir);
    c.args(["run", "--detach", "--name", name, "--accel", "emu", "--mem", mem])
        .arg("--kernel")
        .arg(artifact(kernel))
        .arg("--initrd")
        .arg(artifact("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(cmdline)
        .stdin(Stdio::null());
    c
}

/// [`detached_on`] with the minimal kernel.
pub fn detached(run_dir: &std::path::Path, name: &str, mem: &str, cmd: &str) -> Command {
    detached_on(run_dir, name, "kernel/vmlinux", mem, cmd)
}

/// Run a `vessel` command that must succeed; its output.
pub fn launch(c: &mut Command) -> Output {
    let o = c.timed_output().unwrap();
    assert!(o.status.success(), "{c:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// `vessel ARGS` on the VMs of `run_dir`, whatever its outcome.
pub fn cli(run_dir: &std::path::Path, args: &[&str]) -> Output {
    runtime_cmd(run_dir)
        .args(args)
        .stdin(Stdio::null())
        .timed_output()
        .unwrap()
}

/// [`cli`] that must succeed.
pub fn cli_ok(run_dir: &std::path::Path, args: &[&str]) -> Output {
    let o = cli(run_dir, args);
    assert!(
        o.status.success(),
        "vessel {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A named VM's console output so far.
pub fn console_log(run_dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(run_dir.join(name).join("console.log")).unwrap_or_default()
}

/// Wait until a named VM's console shows `what`; its console output then.
pub fn wait_log(run_dir: &std::path::Path, name: &str, what: &str, timeout: std::time::Duration) -> String {
    let start = std::time::Instant::now();
    loop {
        let l = console_log(run_dir, name);
        if l.contains(what) {
            return l;
        }
        assert!(
            start.elapsed() < timeout,
            "{name}: no {what:?} within {timeout:?}:\n{l}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// As [`wait_log`], for a whole line.
pub fn wait_line(run_dir: &std::path::Path, name: &str, line: &str, timeout: std::time::Duration) {
    let start = std::time::Instant::now();
    while !console_log(run_dir, name).lines().any(|l| l.trim_end() == line) {
        assert!(
            start.elapsed() < timeout,
            "{name}: no line {line:?} within {timeout:?}:\n{}",
            console_log(run_dir, name)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// One API request with curl, as Firecracker's getting-started guide does:
/// the status and the body.
pub fn curl(sock: &std::path::Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(sock)
        .args(["-X", method])
        .arg(format!("http://localhost{path}"))
        .args(["-H", "Accept: application/json", "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let o = c.output().expect("curl is needed (guest/build-all.sh installs it)");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The MD5 of `data` in hex, by md5sum (what the guest uses).
pub fn md5_of(data: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum is needed by this test");
    c.stdin.as_mut().unwrap().write_all(data).unwrap();
    drop(c.stdin.take());
    String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout)[..32].to_string()
}

/// The checksum the guests' shell loop computes:
/// `s=SEED; for i in 0..N: s = (s*31 + i) % 1000003`.
pub fn cpu_sum(seed: u64, n: u64) -> u64 {
    let mut s = seed;
    for i in 0..n {
        s = (s * 31 + i) % 1_000_003;
    }
    s
}

/// Kills and reaps a child process when the test ends, pass or fail.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An API request to the detached VM `name` under `run_dir` (10 s at most).
pub fn vm_api(
    run_dir: &std::path::Path,
    name: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> vessel::api::client::Reply {
    let sock = run_dir.join(name).join("api.sock");
    vessel::api::client::request(&sock, method, path, body, std::time::Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{name}: {method} {path}: {e}"))
}

/// The process id of the detached VM `name` under `run_dir`.
pub fn vm_pid(run_dir: &std::path::Path, name: &str) -> i32 {
    let file = run_dir.join(name).join("pid");
    std::fs::read_to_string(&file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", file.display()))
}
