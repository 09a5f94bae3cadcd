//! `vessel exec`: run one command in a throwaway VM (the default guest with
//! its agent), or in a running VM that has the agent, and pass its stdin,
//! stdout, stderr, exit status and signals through. The command reaches
//! the agent over vsock (`CONNECT 1024` on the VM's hybrid socket; the
//! frames are in `vessel_agent`).
//!
//! A throwaway VM is a `vessel run` child in a private temporary
//! directory: its own process group (a Ctrl-C reaches the command, not the
//! VM), killed with the exec (PR_SET_PDEATHSIG), and removed with its
//! directory when the command ends, so nothing is left behind.
//!
//! Warm start: with the default guest and no disks or network, the VM is
//! a clone restored from a snapshot of that guest booted to an idle agent
//! (taken once, cached next to the guest, [`warm_snapshot`]). Its memory
//! is the snapshot's file mapped copy-on-write (`MAP_PRIVATE`), so clones
//! share no writable state; its vsock socket is its own (`vessel run
//! --vsock-uds`, the API's `vsock_override`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vessel_agent::{read_frame, write_frame, Request, AGENT_PORT};

/// How long a throwaway VM may take to boot to its agent.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a clone of the warm-start snapshot may take to answer (it
/// takes well under a second; then the exec boots instead).
const WARM_TIMEOUT: Duration = Duration::from_secs(60);
/// The exit code after `--timeout` (as timeout(1)).
pub const TIMEOUT_EXIT: u8 = 124;
/// Signals passed on to the command.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Run in this running VM (it needs --vsock and the agent:
    /// `vessel.agent=1` on the default guest's command line) instead of a
    /// throwaway one.
    pub name: Option<String>,
    /// Guest memory of the throwaway VM, e.g. 256M.
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// vCPUs of the throwaway VM.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// A disk for the throwaway VM, as `vessel run --disk` (read-only
    /// unless readonly=off).
    #[arg(long = "disk", value_name = "path=IMG[,readonly=on]")]
    pub disks: Vec<String>,
    /// Networking: `none` (the default) or a `vessel run --net` value.
    #[arg(long = "net", default_value = "none")]
    pub net: String,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Kernel [default: the cached default guest's].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk with the agent [default: the cached default guest's].
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// CPU engine: kvm, emu or auto.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Environment for the command: KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the command.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Boot the guest instead of starting from the cached snapshot of the
    /// booted default guest (only that guest, with no --disk or --net,
    /// starts warm).
    #[arg(long)]
    pub cold: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Run `vessel exec`; its exit code is the command's.
pub fn main(a: ExecArgs) -> ExitCode {
    match exec(a) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vessel exec: {e}");
            ExitCode::from(125)
        }
    }
}

/// The signals passed on to the command, as a set.
fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

fn exec(a: ExecArgs) -> Result<u8, String> {
    // From here on the signals are pending until the command runs and
    // then go to it; this thread and every thread it starts block them.
    let set = forwarded_set();
    // SAFETY: `set` is a valid sigset_t; no old mask is asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if let Some(kv) = a.env.iter().find(|kv| !kv.contains('=')) {
        return Err(format!("--env {kv}: expected KEY=VALUE"));
    }
    let req = Request {
        argv: a.command.clone(),
        env: a.env.clone(),
        cwd: a.cwd.clone(),
    };
    let timeout = match a.timeout {
        Some(t) if !(t > 0.0 && t < 1e9) => return Err(format!("--timeout {t}: expected seconds > 0")),
        t => t.map(Duration::from_secs_f64),
    };
    if let Some(name) = &a.name {
        let uds = vsock_of(name)?;
        let conn = connect_agent(&uds, Instant::now() + Duration::from_secs(10), || Ok(()))?;
        return session(conn, &req, timeout);
    }
    if warm_eligible(&a) {
        match warm_start(&a) {
            Ok((_vm, conn)) => return session(conn, &req, timeout),
            // A warm start is an optimisation: say why, and boot.
            Err(e) => eprintln!("vessel exec: no warm start ({e}); booting"),
        }
    }
    let vm = Throwaway::start(&a)?;
    let conn = connect_agent(&vm.uds, Instant::now() + BOOT_TIMEOUT, || vm.check_alive())?;
    session(conn, &req, timeout)
}

/// The hybrid vsock socket of the running VM `name`.
fn vsock_of(name: &str) -> Result<PathBuf, String> {
    let sock = crate::cli::api_of(name)?;
    let r = crate::api::client::request(&sock, "GET", "/vm/config", None, Duration::from_secs(10))
        .map_err(|e| format!("{name}: {e}"))?;
    let cfg = r.json();
    cfg["vsock"]["uds_path"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| format!("{name} has no vsock device (start it with --vsock cid=3,uds=PATH)"))
}

/// Connect to the agent through the hybrid socket, retrying while the
/// guest boots (`alive` says whether to keep waiting).
fn connect_agent(uds: &Path, deadline: Instant, alive: impl Fn() -> Result<(), String>) -> Result<UnixStream, String> {
    let started = Instant::now();
    loop {
        if let Ok(mut s) = UnixStream::connect(uds) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            if writeln!(s, "CONNECT {AGENT_PORT}").is_ok() {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    if b[0] == b'\n' || line.len() > 32 {
                        break;
                    }
                    line.push(b[0]);
                }
                if line.starts_with(b"OK ") {
                    let _ = s.set_read_timeout(None);
                    return Ok(s);
                }
            }
        }
        alive()?;
        if Instant::now() > deadline {
            return Err(format!(
                "no agent answered on vsock port {AGENT_PORT} through {}",
                uds.display()
            ));
        }
        // A restored clone answers within milliseconds; a booting guest
        // takes seconds, and needs no tight polling.
        let pause = if started.elapsed() < Duration::from_secs(1) {
            2
        } else {
            20
        };
        std::thread::sleep(Duration::from_millis(pause));
    }
}

/// Run `req` over `conn` and pass the streams through; the exit code.
fn session(conn: UnixStream, req: &Request, timeout: Option<Duration>) -> Result<u8, String> {
    let writer = Arc::new(Mutex::new(conn.try_clone().map_err(|e| e.to_string())?));
    let send = {
        let writer = writer.clone();
        move |kind: u8, data: &[u8]| {
            let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
            write_frame(&mut *w, kind, data)
        }
    };
    send(vessel_agent::RUN, &req.encode()).map_err(|e| format!("sending the command: {e}"))?;
    // Signals for the command (blocked since `exec` began), taken by one
    // thread with sigwait.
    let set = forwarded_set();
    {
        let send = send.clone();
        std::thread::spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the call.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            if send(vessel_agent::SIGNAL, &sig.to_le_bytes()).is_err() {
                return;
            }
        });
    }
    {
        let send = send.clone();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if send(vessel_agent::STDIN, &buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = send(vessel_agent::STDIN_EOF, &[]);
        });
    }
    let timed_out = Arc::new(AtomicBool::new(false));
    if let Some(t) = timeout {
        let send = send.clone();
        let flag = timed_out.clone();
        let conn = conn.try_clone().map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            std::thread::sleep(t);
            flag.store(true, Ordering::Release);
            let _ = send(vessel_agent::SIGNAL, &libc::SIGKILL.to_le_bytes());
            // The agent answers with the status at once; if it cannot,
            // give up on it.
            std::thread::sleep(Duration::from_secs(5));
            let _ = conn.shutdown(std::net::Shutdown::Both);
        });
    }
    let mut reader = conn;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let result = loop {
        match read_frame(&mut reader) {
            Ok(Some((vessel_agent::STDOUT, d))) => {
                let _ = out.write_all(&d).and_then(|_| out.flush());
            }
            Ok(Some((vessel_agent::STDERR, d))) => {
                let _ = err.write_all(&d);
            }
            Ok(Some((vessel_agent::EXIT, d))) if d.len() == 4 => {
                break Ok(i32::from_le_bytes([d[0], d[1], d[2], d[3]]).clamp(0, 255) as u8);
            }
            Ok(Some((vessel_agent::FAILED, d))) => {
                eprintln!("vessel exec: {}", String::from_utf8_lossy(&d));
                break Ok(127);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) if timed_out.load(Ordering::Acquire) => break Ok(TIMEOUT_EXIT),
            Ok(None) => break Err("the agent closed the connection without an exit status".to_string()),
            Err(e) => break Err(format!("reading from the agent: {e}")),
        }
    };
    if timed_out.load(Ordering::Acquire) {
        eprintln!("vessel exec: timed out after {:?}", timeout.unwrap_or_default());
        return Ok(TIMEOUT_EXIT);
    }
    result
}

/// A throwaway VM: a `vessel run` child and its private directory, both
/// gone when this is dropped.
struct Throwaway {
    child: Mutex<Child>,
    dir: PathBuf,
    uds: PathBuf,
}

/// The default guest's kernel command line (the agent instead of a shell).
const AGENT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet vessel.agent=1";

fn cache_dir() -> Result<PathBuf, String> {
    std::env::var_os("VESSEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vessel")))
        .ok_or_else(|| "neither VESSEL_CACHE nor HOME is set".to_string())
}

fn default_guest(rel: &str) -> Result<PathBuf, String> {
    let p = cache_dir()?.join(rel);
    if !p.exists() {
        return Err(format!(
            "{} is missing: build the default guest with guest/build-all.sh (or give --kernel and --initrd)",
            p.display()
        ));
    }
    Ok(p)
}

impl Throwaway {
    fn start(a: &ExecArgs) -> Result<Throwaway, String> {
        let kernel = match &a.kernel {
            Some(k) => k.clone(),
            None => default_guest("kernel/vmlinux")?,
        };
        let initrd = match &a.initrd {
            Some(i) => i.clone(),
            None => default_guest("initramfs.cpio.gz")?,
        };
        let dir = private_dir()?;
        let uds = dir.join("v.sock");
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the vessel binary: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "run",
            "--accel",
            &a.accel,
            "--mem",
            &a.mem,
            "--cpus",
            &a.cpus.to_string(),
        ])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--cmdline")
        .arg(AGENT_CMDLINE)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()));
        for d in &a.disks {
            // Read-only unless asked otherwise.
            let d = if d.contains("readonly=") {
                d.clone()
            } else {
                format!("{d},readonly=on")
            };
            cmd.arg("--disk").arg(d);
        }
        if a.net != "none" {
            cmd.arg("--net").arg(&a.net);
        }
        Throwaway::spawn(cmd, dir, uds)
    }

    /// A clone of the snapshot in `snap`, with its own vsock socket.
    fn restore(snap: &Path) -> Result<Throwaway, String> {
        let dir = private_dir()?;
        let uds = dir.join("v.sock");
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the vessel binary: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("run").arg("--restore").arg(snap).arg("--vsock-uds").arg(&uds);
        Throwaway::spawn(cmd, dir, uds)
    }

    /// Start `cmd` (a `vessel run`) as the VM of private directory `dir`.
    fn spawn(mut cmd: Command, dir: PathBuf, uds: PathBuf) -> Result<Throwaway, String> {
        let logs = std::fs::File::create(dir.join("vm.log")).and_then(|f| Ok((f.try_clone()?, f)));
        let (log, log2) = match logs {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.to_string());
            }
        };
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
        let set = forwarded_set();
        // SAFETY: prctl and sigprocmask are async-signal-safe; the closure
        // allocates nothing. The VM gets the signals we block back.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("starting the VM: {e}"));
            }
        };
        Ok(Throwaway {
            child: Mutex::new(child),
            dir,
            uds,
        })
    }

    fn check_alive(&self) -> Result<(), String> {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match c.try_wait() {
            Ok(None) => Ok(()),
            _ => {
                let log = std::fs::read_to_string(self.dir.join("vm.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(format!("the VM ended before its agent answered:\n{}", tail.join("\n")))
            }
        }
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let c = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = c.kill();
        let _ = c.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new directory only we can enter, for the VM's socket and log.
fn private_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let mut rnd = [0u8; 8];
        // SAFETY: getrandom writes at most 8 bytes into `rnd`, which is 8 long.
        unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
        let p = base.join(format!(
            "vessel-exec-{}-{:016x}{i}",
            std::process::id(),
            u64::from_le_bytes(rnd)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", p.display())),
        }
    }
    Err("cannot create a private temporary directory".into())
}

/// Whether this exec can start from the cached snapshot: the default
/// guest, no disks, no network, and no `--cold`.
fn warm_eligible(a: &ExecArgs) -> bool {
    !a.cold && a.kernel.is_none() && a.initrd.is_none() && a.disks.is_empty() && a.net == "none"
}

/// A clone of the cached snapshot of the default guest, and the
/// connection to its agent.
fn warm_start(a: &ExecArgs) -> Result<(Throwaway, UnixStream), String> {
    let kernel = default_guest("kernel/vmlinux")?;
    let initrd = default_guest("initramfs.cpio.gz")?;
    let snap = warm_snapshot(a, &kernel, &initrd)?;
    let vm = Throwaway::restore(&snap.dir)?;
    // The snapshot may be replaced only after the clone has its memory
    // mapped: hold the shared lock until the agent answers.
    let conn = connect_agent(&vm.uds, Instant::now() + WARM_TIMEOUT, || vm.check_alive())?;
    drop(snap);
    Ok((vm, conn))
}

/// The cached snapshot of the booted default guest, held with a shared
/// lock so that no builder removes it while a clone starts from it.
struct WarmSnapshot {
    dir: PathBuf,
    _lock: std::fs::File,
}

/// What the snapshot depends on: the kernel and initramfs (path, size,
/// modification time, inode), the machine (memory, vCPUs, engine), the
/// command line, and this vessel binary (its version and its file, so a
/// rebuilt vessel takes a new snapshot). Each change gives a new key, so
/// a stale snapshot is never used.
fn snapshot_key(a: &ExecArgs, kernel: &Path, initrd: &Path) -> Result<String, String> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vessel binary: {e}"))?;
    for p in [kernel, initrd, exe.as_path()] {
        let m = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        (p, m.len(), m.mtime(), m.mtime_nsec(), m.ino(), m.dev()).hash(&mut h);
    }
    (env!("CARGO_PKG_VERSION"), &a.mem, a.cpus, &a.accel, AGENT_CMDLINE).hash(&mut h);
    Ok(format!("{:016x}", h.finish()))
}

/// Take (or, with LOCK_NB, try to take) an flock on `f`.
fn flock(f: &std::fs::File, op: libc::c_int) -> bool {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return true;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// The warm-start snapshot for `a`, built first when there is none.
/// Built once: the first exec takes the key's lock exclusively and builds
/// into a temporary directory that it renames into place; execs that
/// come meanwhile wait on the lock, then find it.
fn warm_snapshot(a: &ExecArgs, kernel: &Path, initrd: &Path) -> Result<WarmSnapshot, String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = cache_dir()?.join("exec-snapshots");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&base)
        .map_err(|e| format!("{}: {e}", base.display()))?;
    let key = snapshot_key(a, kernel, initrd)?;
    let dir = base.join(&key);
    let lock_path = base.join(format!("{key}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    let complete =
        |d: &Path| d.join(crate::cli::SNAPSHOT_STATE).exists() && d.join(crate::cli::SNAPSHOT_MEMORY).exists();
    if !(flock(&lock, libc::LOCK_SH) && complete(&dir)) {
        // Build it, one exec at a time.
        if !flock(&lock, libc::LOCK_EX) {
            return Err(format!("{}: cannot lock it", lock_path.display()));
        }
        if !complete(&dir) {
            eprintln!("vessel exec: taking a snapshot of the booted default guest for warm starts (once)");
            let tmp = base.join(format!(".building-{key}"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            let built = build_snapshot(a, kernel, initrd, &tmp)
                .and_then(|()| std::fs::rename(&tmp, &dir).map_err(|e| format!("{}: {e}", dir.display())));
            if let Err(e) = built {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(format!("taking the warm-start snapshot: {e}"));
            }
            remove_stale_snapshots(&base, &key);
        }
        // Down to shared: other execs may start from it now.
        flock(&lock, libc::LOCK_SH);
    }
    Ok(WarmSnapshot { dir, _lock: lock })
}

/// Remove the snapshots of other keys (an older vessel or guest) that no
/// exec is starting from (their lock can be taken).
fn remove_stale_snapshots(base: &Path, key: &str) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(other) = name.strip_suffix(".lock") else {
            continue;
        };
        if other == key {
            continue;
        }
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(e.path()) else {
            continue;
        };
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            let _ = std::fs::remove_dir_all(base.join(other));
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Boot the default guest, wait until its agent answers, and snapshot it
/// (paused) into `out`.
fn build_snapshot(a: &ExecArgs, kernel: &Path, initrd: &Path, out: &Path) -> Result<(), String> {
    let dir = private_dir()?;
    let uds = dir.join("v.sock");
    let api = dir.join("api.sock");
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vessel binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "run",
        "--accel",
        &a.accel,
        "--mem",
        &a.mem,
        "--cpus",
        &a.cpus.to_string(),
    ])
    .arg("--kernel")
    .arg(kernel)
    .arg("--initrd")
    .arg(initrd)
    .arg("--cmdline")
    .arg(AGENT_CMDLINE)
    .arg("--vsock")
    .arg(format!("cid=3,uds={}", uds.display()))
    .arg("--api-sock")
    .arg(&api);
    let vm = Throwaway::spawn(cmd, dir, uds)?;
    let probe = connect_agent(&vm.uds, Instant::now() + BOOT_TIMEOUT, || vm.check_alive())?;
    drop(probe);
    // Let the guest see the probe's close and settle into idle.
    std::thread::sleep(Duration::from_millis(300));
    let call = |method: &str, path: &str, body: &str| -> Result<(), String> {
        let r = crate::api::client::request(&api, method, path, Some(body), Duration::from_secs(60))
            .map_err(|e| format!("the VM's API: {e}"))?;
        if r.status >= 400 {
            return Err(format!("{method} {path}: {}", r.fault()));
        }
        Ok(())
    };
    call("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    let body = serde_json::json!({
        "snapshot_type": "Full",
        "snapshot_path": out.join(crate::cli::SNAPSHOT_STATE),
        "mem_file_path": out.join(crate::cli::SNAPSHOT_MEMORY),
    })
    .to_string();
    call("PUT", "/snapshot/create", &body)
}
