//! Helpers for the tests that boot the real test guest (the minimal Linux
//! kernel and busybox initramfs from `guest/build-all.sh`) on a `Machine`
//! in this process, so they can pause it, look at its memory and devices,
//! and feed its console. Engine: emu.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod payload;

use vmm::machine::{ConsoleInput, MachineConfig, RunOutcome, VmHandle};
use vmm::{EngineKind, Machine};

/// How long one guest may take before it counts as hung: a hung guest
/// fails its test instead of stalling CI.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

pub fn cache() -> PathBuf {
    std::env::var_os("VESSEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel"))
}

/// A guest artifact; a missing one fails the test with what to do.
pub fn artifact(rel: &str) -> PathBuf {
    let p = cache().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run guest/build-all.sh first (scripts/test-all does), or set VESSEL_CACHE",
        p.display()
    );
    p
}

pub fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
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

/// The minimal guest running `cmd` (guest/init's protocol), then ending as
/// `end` says (reboot, poweroff, halt).
pub fn guest_config(cmd: &str, end: &str) -> MachineConfig {
    MachineConfig {
        initrd: Some(artifact("initramfs.cpio.gz")),
        cmdline: format!(
            "console=ttyS0 reboot=k panic=-1 vessel.end={end} vessel.cmd={}",
            b64(cmd)
        ),
        ..MachineConfig::new(artifact("kernel/vmlinux"), 128 << 20)
    }
}

/// What the guest wrote on its serial console.
#[derive(Clone, Default)]
pub struct ConsoleLog(Arc<Mutex<Vec<u8>>>);

impl Write for ConsoleLog {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleLog {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A guest running on its own thread.
pub struct Guest {
    pub vm: VmHandle,
    pub input: ConsoleInput,
    pub console: ConsoleLog,
    run: Option<JoinHandle<RunOutcome>>,
    started: Instant,
}

impl Guest {
    /// Build the machine and run it on a new thread, in the network
    /// namespace `netns` (a path under /var/run/netns) when given, so that
    /// its TAP devices are found there.
    pub fn boot(cfg: MachineConfig, netns: Option<&Path>) -> Guest {
        let console = ConsoleLog::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = console.clone();
        let netns = netns.map(Path::to_path_buf);
        let run = std::thread::spawn(move || {
            if let Some(ns) = netns {
                enter_netns(&ns);
            }
            let machine = match Machine::with_engine(&cfg, Box::new(log), EngineKind::Emu) {
                Ok(m) => m,
                Err(e) => panic!("cannot build the machine: {e}"),
            };
            tx.send((machine.vm_handle(), machine.input_handle())).unwrap();
            machine.run()
        });
        let (vm, input) = match rx.recv() {
            Ok(h) => h,
            Err(_) => panic!("the machine thread failed: {:?}", run.join().err()),
        };
        Guest {
            vm,
            input,
            console,
            run: Some(run),
            started: Instant::now(),
        }
    }

    /// Wait until the console shows `needle`; fail the test (with the
    /// console) if the guest ends or time runs out first.
    pub fn wait_for(&self, needle: &str) {
        self.wait_for_within(needle, RUN_TIMEOUT)
    }

    /// [`Guest::wait_for`] with a shorter limit, from now.
    pub fn wait_for_within(&self, needle: &str, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let text = self.console.text();
            if text.contains(needle) {
                return;
            }
            let ended = self.run.as_ref().is_some_and(|h| h.is_finished());
            if ended || self.started.elapsed() > RUN_TIMEOUT || t0.elapsed() > limit {
                self.vm.quit();
                panic!(
                    "{} before the guest printed {needle:?}; console:\n{}",
                    if ended { "the machine stopped" } else { "timed out" },
                    tail(&text)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the run to end (within `limit`); the outcome.
    pub fn finish(mut self, limit: Duration) -> RunOutcome {
        let h = self.run.take().unwrap();
        let t0 = Instant::now();
        while !h.is_finished() {
            if t0.elapsed() > limit || self.started.elapsed() > RUN_TIMEOUT {
                self.vm.quit();
                let _ = h.join();
                panic!(
                    "the guest did not end within {limit:?}; console:\n{}",
                    tail(&self.console.text())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match h.join() {
            Ok(o) => o,
            Err(_) => panic!("the machine thread panicked; console:\n{}", tail(&self.console.text())),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(h) = self.run.take() {
            self.vm.quit();
            let _ = h.join();
        }
    }
}

/// The last lines of a console log, for failure messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn enter_netns(path: &Path) {
    use std::os::unix::io::AsRawFd;
    let ns = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: setns on a namespace fd we opened; it changes only this
    // thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// A network namespace with a TAP interface `tap` at `host_ip` (CIDR)
/// in it; removed when dropped. Needs root (CAP_NET_ADMIN and
/// CAP_SYS_ADMIN): without, the test fails and says so.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str, tap: &str, host_ip: &str) -> NetNs {
        let name = format!("vessel-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let o = Command::new("ip")
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("ip (iproute2): {e}"));
            assert!(
                o.status.success(),
                "ip {args:?}: {} (this test needs root: CAP_NET_ADMIN to create the tap and the namespace)",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs { name: name.clone() };
        ip(&["-n", &name, "tuntap", "add", tap, "mode", "tap"]);
        ip(&["-n", &name, "addr", "add", host_ip, "dev", tap]);
        ip(&["-n", &name, "link", "set", tap, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Run `f` on a thread inside the namespace (its sockets live there).
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vessel-vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }

    /// A sparse blank file of `size` bytes.
    pub fn blank(&self, name: &str, size: u64) -> PathBuf {
        let p = self.0.join(name);
        std::fs::File::create(&p).and_then(|f| f.set_len(size)).expect("image");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
