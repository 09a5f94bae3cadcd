//! The control plane end to end: Firecracker's API driven with curl over
//! the real Unix socket, `firecracker --config-file`, bad requests, and the
//! multi-VM CLI (detached VMs, ps, pause, console, logs, stop), all with
//! the real guest under emu.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn ok(sock: &Path, method: &str, path: &str, body: &str) {
    let (code, text) = curl(sock, method, path, Some(body));
    assert_eq!(code, 204, "{method} {path} {body}: {text}");
}

fn json(sock: &Path, path: &str) -> serde_json::Value {
    let (code, text) = curl(sock, "GET", path, None);
    assert_eq!(code, 200, "GET {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
}

/// A child whose stdout is collected as it arrives; killed when dropped.
struct Vmm {
    child: Child,
    out: Arc<Mutex<String>>,
    _dog: Watchdog,
}

impl Vmm {
    fn spawn(mut cmd: Command) -> Vmm {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vessel");
        let out = Arc::new(Mutex::new(String::new()));
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let dog = Watchdog::new(&child);
        Vmm { child, out, _dog: dog }
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn wait_for(&self, what: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.text().contains(what) {
            assert!(
                start.elapsed() < timeout,
                "no {what:?} within {timeout:?}; output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "vessel did not exit within {timeout:?}; output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(sock: &Path) {
    let start = Instant::now();
    while curl(sock, "GET", "/", None).0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "API socket never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ticks(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("tick")).count()
}

const TICKER: &str = "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.2; done";

/// Firecracker's getting-started sequence, with curl: boot source,
/// machine config, a root drive, InstanceStart; then pause, resume and
/// Ctrl-Alt-Del, which ends the VMM with exit 0.
#[test]
fn firecracker_getting_started_with_curl() {
    let s = Scratch::new("api-start");
    let sock = s.0.join("api.sock");
    let rootfs = s.0.join("rootfs.ext4");
    std::fs::copy(artifact("disk.ext4"), &rootfs).unwrap();
    let mut vmm = Vmm::spawn({
        let mut c = vessel();
        c.arg("run").arg("--api-sock").arg(&sock);
        c
    });
    wait_for_socket(&sock);
    assert_eq!(json(&sock, "/")["state"], "Not started");
    ok(
        &sock,
        "PUT",
        "/boot-source",
        &serde_json::json!({
            "kernel_image_path": artifact("kernel/vmlinux"),
            "initrd_path": artifact("initramfs.cpio.gz"),
            "boot_args": boot_args(&format!("mount /dev/vda /mnt && echo ROOT-MOUNTED; {TICKER}")),
        })
        .to_string(),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "accel": "emu"}"#,
    );
    ok(
        &sock,
        "PUT",
        "/drives/rootfs",
        &serde_json::json!({"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": false})
            .to_string(),
    );
    let config = json(&sock, "/vm/config");
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["drives"][0]["drive_id"], "rootfs");
    ok(&sock, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    vmm.wait_for("tick3", Duration::from_secs(120));
    assert!(vmm.text().contains("ROOT-MOUNTED"), "{}", vmm.text());
    let info = json(&sock, "/");
    assert_eq!(
        (info["state"].as_str(), info["engine"].as_str()),
        (Some("Running"), Some("emu"))
    );
    // Pre-boot configuration is refused once the VM runs.
    let (code, text) = curl(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#),
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("fault_message"), "{text}");

    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(json(&sock, "/")["state"], "Paused");
    let before = ticks(&vmm.text());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ticks(&vmm.text()), before, "the guest ran while paused");
    let (code, _) = curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(code, 400, "pausing a paused VM is refused");
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let start = Instant::now();
    while ticks(&vmm.text()) < before + 3 {
        assert!(start.elapsed() < Duration::from_secs(60), "no ticks after resume");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(json(&sock, "/")["state"], "Running");

    ok(&sock, "PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let status = vmm.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{}", vmm.text());
}

/// `firecracker --api-sock S --config-file F` (the binary under that name)
/// boots the guest at once.
#[test]
fn started_as_firecracker_with_a_config_file() {
    let s = Scratch::new("api-fc");
    let fc = s.0.join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vessel"), &fc).unwrap();
    let config = s.0.join("vm.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "boot-source": {
                "kernel_image_path": artifact("kernel/vmlinux"),
                "initrd_path": artifact("initramfs.cpio.gz"),
                "boot_args": boot_args("echo hello-from-config-file") + " vessel.end=reboot",
            },
            "drives": [],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "accel": "emu"},
            "network-interfaces": [],
            "balloon": null, "vsock": null, "logger": null, "metrics": null, "mmds-config": null,
        })
        .to_string(),
    )
    .unwrap();
    let sock = s.0.join("fc.sock");
    let o = Command::new(&fc)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config)
        .arg("--id")
        .arg("cfg-test")
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert_clean_run(&o);
    assert!(stdout(&o).contains("hello-from-config-file"));

    // Unsupported and unknown flags: one line naming the flag, never ignored.
    for (flag, name) in [
        (vec!["--boot-timer"], "--boot-timer"),
        (vec!["--frobnicate"], "--frobnicate"),
        (vec!["--seccomp-filter", "/x.bpf"], "--seccomp-filter"),
    ] {
        let o = Command::new(&fc).args(&flag).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag:?} accepted");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(name), "{err}");
    }
    let o = Command::new(&fc).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("Firecracker v"));
}

/// Bad input never breaks the VMM, and leaves its state unchanged: each
/// gets a 400 with a fault_message.
#[test]
fn bad_requests_get_400_and_change_nothing() {
    let s = Scratch::new("api-bad");
    let sock = s.0.join("api.sock");
    let vmm = Vmm::spawn({
        let mut c = vessel();
        c.arg("run").arg("--api-sock").arg(&sock);
        c
    });
    wait_for_socket(&sock);
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    let before = json(&sock, "/vm/config");
    let big = format!(
        r#"{{"drive_id": "big", "path_on_host": "{}", "is_root_device": false}}"#,
        "x".repeat(60_000)
    );
    let cases: Vec<(&str, &str, Option<&str>)> = vec![
        ("PUT", "/machine-config", Some("{")),
        ("PUT", "/machine-config", Some("[1, 2]")),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 256, "turbo": true}"#),
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 0, "mem_size_mib": 256}"#),
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 99999, "mem_size_mib": 256}"#),
        ),
        ("PATCH", "/machine-config", Some("{}")),
        ("PUT", "/machine-config", None),
        ("DELETE", "/machine-config", None),
        ("POST", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)),
        ("PUT", "/actions", Some(r#"{"action_type": "Reboot"}"#)),
        ("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)),
        ("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        ("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)),
        ("PUT", "/drives/big", Some(&big)),
        (
            "PUT",
            "/drives/one",
            Some(r#"{"drive_id": "two", "path_on_host": "/x", "is_root_device": false}"#),
        ),
        (
            "PUT",
            "/drives/a.b",
            Some(r#"{"drive_id": "a.b", "path_on_host": "/x", "is_root_device": false}"#),
        ),
        (
            "PATCH",
            "/drives/none",
            Some(r#"{"drive_id": "none", "path_on_host": "/y"}"#),
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "a/b"}"#),
        ),
        (
            "PUT",
            "/entropy",
            Some(r#"{"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}"#),
        ),
        ("PUT", "/logger", Some(r#"{"level": "Loud"}"#)),
        ("GET", "/nowhere", None),
        ("GET", "/drives", None),
        ("GET", "/drives/a/b", None),
        ("PUT", "/snapshot/create", Some("{}")),
    ];
    for (m, p, b) in cases {
        let (code, text) = curl(&sock, m, p, b);
        assert_eq!(code, 400, "{m} {p}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{m} {p}: {e}: {text}"));
        assert!(
            v["fault_message"].as_str().is_some_and(|s| !s.is_empty()),
            "{m} {p}: {text}"
        );
    }
    // Not HTTP at all: the connection is dropped, the server lives on.
    {
        use std::io::Write;
        let mut raw = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = raw.write_all(b"\x00\xff garbage \r\n\r\n");
    }
    // Start with no boot source: refused, still not started.
    let (code, _) = curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(code, 400);
    assert_eq!(
        json(&sock, "/vm/config"),
        before,
        "a refused request changed the configuration"
    );
    assert_eq!(json(&sock, "/")["state"], "Not started");
    assert!(json(&sock, "/version")["firecracker_version"].is_string());
    drop(vmm);
}

fn start_named(run_dir: &Path, name: &str, cmd: &str) {
    let o = launch(&mut detached(run_dir, name, "128M", cmd));
    assert_eq!(stdout(&o).trim(), name);
}

/// Twenty detached VMs show in `vessel ps` and each stops with `vessel
/// stop`; one of them is paused, inspected and read with `vessel logs`.
#[test]
fn twenty_detached_vms() {
    let s = Scratch::new("api-fleet");
    let run_dir: PathBuf = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let names: Vec<String> = (0..20).map(|i| format!("vm{i:02}")).collect();
    for n in &names {
        start_named(&run_dir, n, "echo FLEET-UP; sleep 100000");
    }
    for n in &names {
        wait_log(&run_dir, n, "FLEET-UP", Duration::from_secs(240));
    }
    let o = cli(&run_dir, &["ps"]);
    let table = stdout(&o);
    for n in &names {
        let line = table
            .lines()
            .find(|l| l.starts_with(n.as_str()))
            .unwrap_or_else(|| panic!("{n} missing from ps:\n{table}"));
        assert!(line.contains("Running") && line.contains("emu"), "{line}");
    }
    // Duplicate names are refused.
    let o = runtime_cmd(&run_dir)
        .args(["run", "--detach", "--name", "vm00", "--kernel", "/nonexistent"])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already running"));

    assert!(cli(&run_dir, &["pause", "vm03"]).status.success());
    assert!(stdout(&cli(&run_dir, &["ps"]))
        .lines()
        .any(|l| l.starts_with("vm03") && l.contains("Paused")));
    let inspect: serde_json::Value = serde_json::from_str(&stdout(&cli(&run_dir, &["inspect", "vm03"]))).unwrap();
    assert_eq!(inspect["instance"]["state"], "Paused");
    assert_eq!(inspect["config"]["machine-config"]["mem_size_mib"], 128);
    assert!(cli(&run_dir, &["resume", "vm03"]).status.success());
    assert!(stdout(&cli(&run_dir, &["logs", "vm03"])).contains("FLEET-UP"));

    for n in &names {
        let o = cli(&run_dir, &["stop", n]);
        assert!(o.status.success(), "stop {n}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let table = stdout(&cli(&run_dir, &["ps"]));
    assert_eq!(table.lines().count(), 1, "VMs left after stop:\n{table}");
    let o = cli(&run_dir, &["stop", "vm00"]);
    assert!(!o.status.success(), "stopping a stopped VM must fail");
}

/// Pasting 4 KiB into `vessel console` arrives whole in the guest.
#[test]
fn console_paste_arrives_whole() {
    let s = Scratch::new("api-console");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    start_named(
        &run_dir,
        "paste",
        "echo PASTE-READY; head -c 4096 > /tmp/p; echo PASTE-BYTES=$(wc -c < /tmp/p) PASTE-SUM=$(md5sum < /tmp/p | cut -c1-32) PASTE-END; sleep 100000",
    );
    wait_log(&run_dir, "paste", "PASTE-READY", Duration::from_secs(120));
    // 64 lines of 63 characters and a newline.
    let data: String = (0..64)
        .map(|i| {
            let c = (b'A' + (i % 26) as u8) as char;
            format!("{:02}{}\n", i, c.to_string().repeat(61))
        })
        .collect();
    assert_eq!(data.len(), 4096);
    let sum = {
        let mut c = Command::new("md5sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(c.stdin.as_mut().unwrap(), data.as_bytes()).unwrap();
        drop(c.stdin.take());
        String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout)[..32].to_string()
    };
    let mut console = runtime_cmd(&run_dir)
        .args(["console", "paste"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(console.stdin.as_mut().unwrap(), data.as_bytes()).unwrap();
    drop(console.stdin.take());
    // Wait for the end of the line: the console log grows a byte at a
    // time, and "PASTE-SUM=" alone can be read before the sum is whole.
    let log = wait_log(&run_dir, "paste", "PASTE-END", Duration::from_secs(60));
    let _ = console.wait();
    let line = log.lines().find(|l| l.contains("PASTE-SUM=")).unwrap();
    assert!(line.contains("PASTE-BYTES=4096"), "{line}");
    assert!(line.contains(&format!("PASTE-SUM={sum}")), "{line} (want {sum})");
    assert!(cli(&run_dir, &["stop", "paste"]).status.success());
}

/// SIGTERM stops a foreground VM cleanly: exit 0.
#[test]
fn sigterm_stops_cleanly() {
    let s = Scratch::new("api-term");
    let disk = s.0.join("d.img");
    std::fs::copy(artifact("disk.ext4"), &disk).unwrap();
    let mut vmm = Vmm::spawn({
        let mut c = vessel();
        c.args(["run", "--accel", "emu", "--mem", "128M"])
            .arg("--kernel")
            .arg(artifact("kernel/vmlinux"))
            .arg("--initrd")
            .arg(artifact("initramfs.cpio.gz"))
            .arg("--disk")
            .arg(disk_arg(&disk, ""))
            .arg("--cmdline")
            .arg(boot_args(TICKER));
        c
    });
    vmm.wait_for("tick2", Duration::from_secs(120));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    let status = vmm.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", vmm.text());
    assert!(vmm.text().contains("engine: emu"), "the engine is named once on stderr");
}
