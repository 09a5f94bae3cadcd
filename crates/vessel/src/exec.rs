//! `vessel exec`: run one command in a throwaway VM (the default guest with
//! its agent), or in a running VM that has the agent, and pass its stdin,
//! stdout, stderr, exit status and signals through. The command reaches
//! the agent over vsock (`CONNECT 1024` on the VM's hybrid socket; the
//! frames are in `vessel_agent`).
//!
//! A throwaway VM is a `vessel run` child in a private temporary
//! directory: its own process group (a Ctrl-C reaches the command, not the
//! VM), killed with the exec (PR_SET_PDEATHSIG, and a [`Guard`] process
//! for a jailed VM and the files), and removed with its directory when the
//! command ends, so nothing is left behind.
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
    /// Run the throwaway VM without the jail. As root, `vessel exec` runs
    /// the VM's VMM under `vessel jail` (a chroot with only the guest's
    /// files and read-only disks, uid and gid 65534, its own PID and mount
    /// namespaces and cgroup); other users, and VMs with a writable disk
    /// or a qcow2 overlay, run unjailed.
    #[arg(long)]
    pub no_jail: bool,
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
    let jailed = jail_wanted(&a)?;
    if jailed {
        // The jailer's VMM runs in a new PID namespace: once the jailer
        // has forked it and exited, it is our child, to kill and reap.
        // SAFETY: prctl with plain integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    if warm_eligible(&a) {
        match warm_start(&a, jailed) {
            Ok((_vm, conn)) => return session(conn, &req, timeout),
            // A warm start is an optimisation: say why, and boot.
            Err(e) => eprintln!("vessel exec: no warm start ({e}); booting"),
        }
    }
    let vm = Throwaway::start(&a, jailed)?;
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

/// A throwaway VM: a `vessel run` child (or a `vessel jail` child and the
/// VMM it forks) and its private directory, all gone when this is
/// dropped.
struct Throwaway {
    child: Mutex<Option<Child>>,
    dir: PathBuf,
    uds: PathBuf,
    jail: Option<Jail>,
    guard: Option<Guard>,
}

/// The uid and gid of a jailed VMM (`nobody`).
const JAIL_UID: u32 = 65534;

/// Whether the throwaway VM runs in the jail: as root, without
/// `--no-jail`, and with only disks the jail can hold (see
/// [`disk_outside_the_jail`]; otherwise it says why it runs unjailed).
fn jail_wanted(a: &ExecArgs) -> Result<bool, String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if a.no_jail || unsafe { libc::geteuid() } != 0 {
        return Ok(false);
    }
    for d in &a.disks {
        if let Some(why) = disk_outside_the_jail(d)? {
            eprintln!("vessel exec: running the VM unjailed: --disk {d}: {why}");
            return Ok(false);
        }
    }
    Ok(true)
}

/// `vessel run` arguments for the agent's guest: the engine, size,
/// kernel, initrd, agent command line and vsock socket, as the VMM sees
/// those paths (inside the jail or not). `Command::new("run")`: the
/// caller's spawn puts the binary (or the jailer) in front.
fn agent_guest_command(a: &ExecArgs, kernel: &Path, initrd: &Path, uds: &Path) -> Command {
    let mut cmd = Command::new("run");
    cmd.args(["--accel", &a.accel, "--mem", &a.mem, "--cpus", &a.cpus.to_string()])
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--cmdline")
        .arg(AGENT_CMDLINE)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()));
    cmd
}

/// The `--disk` value `spec`, read-only unless it says otherwise.
fn read_only_unless_asked(spec: &str) -> String {
    if spec
        .split(',')
        .any(|kv| kv.starts_with("readonly=") || kv.starts_with("ro="))
    {
        spec.to_string()
    } else {
        format!("{spec},readonly=on")
    }
}

/// Why the disk `spec` cannot go into the jail, if it cannot. The jail
/// holds a read-only disk (the default) as a link to, or copy of, the
/// image, owned by root. A writable one (readonly=off) would need the
/// jailed uid to own the user's image, and a qcow2 overlay names its
/// backing file by a host path the jail does not have: those two run
/// unjailed.
fn disk_outside_the_jail(spec: &str) -> Result<Option<&'static str>, String> {
    use std::io::Read;
    let cfg = crate::device_args::parse_disk(&read_only_unless_asked(spec))?;
    if !cfg.read_only {
        return Ok(Some(
            "a writable disk (readonly=off) would have to belong to the jail's uid",
        ));
    }
    if cfg.format == Some(disk::ImageFormat::Raw) {
        return Ok(None);
    }
    let mut header = [0u8; 16];
    let mut f = std::fs::File::open(&cfg.path).map_err(|e| format!("--disk {}: {e}", cfg.path.display()))?;
    let n = f
        .read(&mut header)
        .map_err(|e| format!("--disk {}: {e}", cfg.path.display()))?;
    // qcow2: magic, version, then the backing file's offset (0: none).
    if n == 16 && header[..4] == *b"QFI\xfb" && header[8..16] != [0u8; 8] {
        return Ok(Some("a qcow2 overlay's backing file is not in the jail"));
    }
    Ok(None)
}

/// A jail of `vessel jail`: `<base>/vessel/<id>/root` (base is
/// `$VESSEL_CACHE/jail`), its cgroup `<id>` (v2) and the VMM's pid, which
/// the jailer writes to `root/vessel.pid` when it forks the VMM into its
/// PID namespace.
struct Jail {
    id: String,
    base: PathBuf,
    root: PathBuf,
    vmm: Mutex<Option<libc::pid_t>>,
}

impl Jail {
    fn new() -> Result<Jail, String> {
        use std::os::unix::fs::DirBuilderExt;
        let base = cache_dir()?.join("jail");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .map_err(|e| format!("{}: {e}", base.display()))?;
        let id = format!("exec-{}-{:016x}", std::process::id(), random_u64());
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the vessel binary: {e}"))?;
        let name = exe.file_name().ok_or("the vessel binary has no file name")?;
        let root = base.join(name).join(&id).join("root");
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        Ok(Jail {
            id,
            base,
            root,
            vmm: Mutex::new(None),
        })
    }

    /// Put `src` into the jail at `/rel`, read-only for the VMM: a hard
    /// link when the file is readable by all and on the same filesystem
    /// (the snapshot's files are made so), a copy otherwise. The VMM's uid
    /// owns neither, so it cannot write them.
    fn place(&self, src: &Path, rel: &str, make_readable: bool) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let src = std::fs::canonicalize(src).map_err(|e| format!("{}: {e}", src.display()))?;
        let dest = self.root.join(rel);
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let mode = std::fs::metadata(&src)
            .map_err(|e| format!("{}: {e}", src.display()))?
            .permissions()
            .mode();
        if make_readable && mode & 0o444 != 0o444 {
            let _ = std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644));
        }
        let readable = make_readable || mode & 0o004 != 0;
        if readable && std::fs::hard_link(&src, &dest).is_ok() {
            return Ok(());
        }
        std::fs::copy(&src, &dest).map_err(|e| format!("copying {} into the jail: {e}", src.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| format!("{}: {e}", dest.display()))
    }

    /// The VMM's pid once the jailer has forked it; only a child of ours
    /// (a pid file the VMM rewrote names no other process).
    fn vmm_pid(&self) -> Option<libc::pid_t> {
        let mut vmm = self.vmm.lock().unwrap_or_else(|e| e.into_inner());
        if vmm.is_none() {
            let text = std::fs::read_to_string(self.root.join("vessel.pid")).ok()?;
            let pid: libc::pid_t = text.trim().parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": the comm may hold spaces.
            let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == std::process::id()).then_some(())?;
            *vmm = Some(pid);
        }
        *vmm
    }

    /// Kill the VMM and what is left in the cgroup, reap it, and remove
    /// the jail's directory and cgroup.
    fn tear_down(&self) {
        if let Some(pid) = self.vmm_pid() {
            // SAFETY: kill and waitpid on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        if let Err(e) = crate::jail::cgroup::remove_v2(Path::new(&self.id)) {
            eprintln!("vessel exec: {e}");
        }
        if let Some(jail_dir) = self.root.parent() {
            let _ = std::fs::remove_dir_all(jail_dir);
        }
    }
}

fn random_u64() -> u64 {
    let mut rnd = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `rnd`, which is 8 long.
    unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
    u64::from_le_bytes(rnd)
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
    fn start(a: &ExecArgs, jailed: bool) -> Result<Throwaway, String> {
        let kernel = match &a.kernel {
            Some(k) => k.clone(),
            None => default_guest("kernel/vmlinux")?,
        };
        let initrd = match &a.initrd {
            Some(i) => i.clone(),
            None => default_guest("initramfs.cpio.gz")?,
        };
        let mut vm = Throwaway::prepare(jailed)?;
        let (kernel, initrd, uds) = match &vm.jail {
            Some(j) => {
                j.place(&kernel, "vmlinux", false)?;
                j.place(&initrd, "initrd", false)?;
                (
                    PathBuf::from("/vmlinux"),
                    PathBuf::from("/initrd"),
                    PathBuf::from("/v.sock"),
                )
            }
            None => (kernel, initrd, vm.uds.clone()),
        };
        let mut cmd = agent_guest_command(a, &kernel, &initrd, &uds);
        for (i, d) in a.disks.iter().enumerate() {
            let d = read_only_unless_asked(d);
            let d = match &vm.jail {
                // Read-only (jail_wanted saw to it): linked or copied in.
                Some(j) => {
                    let cfg = crate::device_args::parse_disk(&d)?;
                    let name = format!("disk{i}");
                    j.place(&cfg.path, &name, false)?;
                    let format = cfg.format.map(|f| format!(",format={f}")).unwrap_or_default();
                    format!("path=/{name},readonly=on{format}")
                }
                None => d,
            };
            cmd.arg("--disk").arg(d);
        }
        if a.net != "none" {
            cmd.arg("--net").arg(&a.net);
        }
        vm.spawn(&cmd)?;
        Ok(vm)
    }

    /// A clone of the snapshot in `snap`, with its own vsock socket.
    fn restore(snap: &Path, jailed: bool) -> Result<Throwaway, String> {
        let mut vm = Throwaway::prepare(jailed)?;
        let (snap, uds) = match &vm.jail {
            Some(j) => {
                // Links to the snapshot's files, read-only for the VMM:
                // its memory is mapped copy-on-write, never written.
                for f in [crate::cli::SNAPSHOT_STATE, crate::cli::SNAPSHOT_MEMORY] {
                    j.place(&snap.join(f), &format!("snapshot/{f}"), true)?;
                }
                (PathBuf::from("/snapshot"), PathBuf::from("/v.sock"))
            }
            None => (snap.to_path_buf(), vm.uds.clone()),
        };
        let mut cmd = Command::new("run");
        cmd.arg("--restore").arg(&snap).arg("--vsock-uds").arg(&uds);
        vm.spawn(&cmd)?;
        Ok(vm)
    }

    /// A VM yet to start, in a new private directory, and in a new jail
    /// when `jailed`.
    fn prepare(jailed: bool) -> Result<Throwaway, String> {
        let dir = private_dir()?;
        let jail = match jailed {
            true => Some(Jail::new().inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })?),
            false => None,
        };
        Ok(Throwaway::new(dir, jail))
    }

    /// A VM yet to start, in private directory `dir` (and `jail`). Dropping
    /// it removes both; so does its [`Guard`] if this process is killed.
    fn new(dir: PathBuf, jail: Option<Jail>) -> Throwaway {
        let uds = match &jail {
            Some(j) => j.root.join("v.sock"),
            None => dir.join("v.sock"),
        };
        let guard = Guard::start(&dir, jail.as_ref())
            .inspect_err(|e| eprintln!("vessel exec: no clean-up guard ({e}); a SIGKILL would leave the VM behind"))
            .ok();
        Throwaway {
            // None until `spawn`.
            child: Mutex::new(None),
            dir,
            uds,
            jail,
            guard,
        }
    }

    /// Start `vessel run` with the arguments of `run` (a Command used as
    /// an argument list: its program is `run`), in the jail if there is
    /// one.
    fn spawn(&mut self, run: &Command) -> Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the vessel binary: {e}"))?;
        let mut cmd = Command::new(&exe);
        if let Some(j) = &self.jail {
            cmd.args(["jail", "--id", &j.id, "--exec-file"])
                .arg(&exe)
                .args(["--uid", &JAIL_UID.to_string(), "--gid", &JAIL_UID.to_string()])
                .arg("--chroot-base-dir")
                .arg(&j.base)
                // The cgroup is `<id>` at the top of the v2 hierarchy.
                .args(["--parent-cgroup=", "--new-pid-ns", "--"]);
        }
        cmd.arg("run").args(run.get_args());
        let (log, log2) = std::fs::File::create(self.dir.join("vm.log"))
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map_err(|e| e.to_string())?;
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
        let child = cmd.spawn().map_err(|e| format!("starting the VM: {e}"))?;
        if let Some(g) = &self.guard {
            g.watch(child.id());
        }
        *self.child.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    fn check_alive(&self) -> Result<(), String> {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let ended = match c.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => return Ok(()),
            Some(Ok(Some(status))) => status,
            _ => return Err(self.ended()),
        };
        let Some(jail) = &self.jail else {
            return Err(self.ended());
        };
        // The jailer exits once it has forked the VMM, which is then ours.
        match jail.vmm_pid() {
            // SAFETY: waitpid on our own child, without blocking.
            Some(pid) if ended.success() && unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == 0 => {
                Ok(())
            }
            _ => Err(self.ended()),
        }
    }

    /// Why the VM is gone: the end of its log.
    fn ended(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("vm.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("the VM ended before its agent answered:\n{}", tail.join("\n"))
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let c = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = c {
            if self.jail.is_some() {
                // The jailer only sets up and forks: let it finish, so
                // that the VMM's pid is known.
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(j) = &self.jail {
            j.tear_down();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // All done here: the guard has nothing left to do.
        if let Some(g) = self.guard.take() {
            g.dismiss();
        }
    }
}

/// Cleans up after a `vessel exec` killed before it could (SIGKILL, the
/// OOM killer). PR_SET_PDEATHSIG on the VM's process is not enough: the
/// jailer forks the VMM into a new PID namespace and changes its uid, and
/// both clear the parent-death signal; and nothing would remove the VM's
/// directory, jail and cgroup. So `vessel exec` forks this guard first: a
/// process in its own process group, holding nothing of ours but the read
/// end of a pipe whose write end only `vessel exec` holds. When `vessel
/// exec` ends, however it ends, the guard reads end-of-file; it then kills
/// the VM's process (by pidfd, so never a recycled pid) and everything in
/// the jail's cgroup (the jailer and the VMM), and removes the jail and the
/// VM's directory. A `vessel exec` that cleaned up itself dismisses it.
struct Guard {
    pid: libc::pid_t,
    /// The write end: the VM's pid goes through it; its close is the
    /// signal.
    pipe: std::fs::File,
}

impl Guard {
    fn start(dir: &Path, jail: Option<&Jail>) -> Result<Guard, String> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two fds into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        // What the guard removes, prepared before the fork.
        let dir = dir.to_path_buf();
        let jail = jail.map(|j| (j.id.clone(), j.root.parent().map(Path::to_path_buf)));
        // SAFETY: the child only makes system calls and plain file-system
        // calls (glibc's fork leaves malloc usable in the child), then
        // _exits; it never returns into the caller.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: closing the two fds pipe2 gave us.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            return Err(format!("fork: {e}"));
        }
        if pid == 0 {
            guard_main(fds[0], &dir, jail);
        }
        // SAFETY: fds[0] is ours to close (the guard has its copy).
        unsafe { libc::close(fds[0]) };
        // SAFETY: fds[1] is a fresh fd that nothing else owns.
        let pipe = unsafe { std::fs::File::from_raw_fd(fds[1]) };
        Ok(Guard { pid, pipe })
    }

    /// Tell the guard the VM's process (`vessel run`, or the jailer).
    fn watch(&self, pid: u32) {
        let _ = (&self.pipe).write_all(&pid.to_le_bytes());
    }

    /// The clean-up is done: end the guard and reap it.
    fn dismiss(self) {
        // SAFETY: kill and waitpid on our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The guard's life (see [`Guard`]): wait for `vessel exec` to end, then
/// kill and remove what is left of its VM.
fn guard_main(read_end: libc::c_int, dir: &Path, jail: Option<(String, Option<PathBuf>)>) -> ! {
    // SAFETY: plain system calls on our own process and fds.
    unsafe {
        // No terminal or process-group signal meant for the exec.
        libc::setpgid(0, 0);
        // Hold nothing of the exec's: not its stdout (a reader would wait
        // for our end of it), not its snapshot lock.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        libc::dup2(read_end, 3);
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
    }
    let mut vm_pidfd: Option<libc::c_int> = None;
    let mut buf = [0u8; 4];
    loop {
        // SAFETY: read into our own 4-byte buffer.
        let n = unsafe { libc::read(3, buf.as_mut_ptr().cast(), 4) };
        if n == 4 {
            let pid = u32::from_le_bytes(buf) as libc::pid_t;
            // SAFETY: pidfd_open of a pid; the fd refers to that process
            // even if the pid is later reused.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if fd >= 0 {
                vm_pidfd = Some(fd as libc::c_int);
            }
            continue;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break;
    }
    if let Some(fd) = vm_pidfd {
        // SAFETY: a pidfd we opened, a signal number, a pollfd of ours.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<u8>(),
                0,
            );
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            libc::poll(&mut p, 1, 5000);
        }
    }
    if let Some((id, jail_dir)) = jail {
        // Kills the VMM, which the jailer forked into the cgroup.
        let _ = crate::jail::cgroup::remove_v2(Path::new(&id));
        if let Some(d) = jail_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    // SAFETY: ends this process without running the parent's destructors.
    unsafe { libc::_exit(0) }
}

/// A new directory only we can enter, for the VM's socket and log.
fn private_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let p = base.join(format!("vessel-exec-{}-{:016x}{i}", std::process::id(), random_u64()));
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
fn warm_start(a: &ExecArgs, jailed: bool) -> Result<(Throwaway, UnixStream), String> {
    let kernel = default_guest("kernel/vmlinux")?;
    let initrd = default_guest("initramfs.cpio.gz")?;
    let snap = warm_snapshot(a, &kernel, &initrd, jailed)?;
    let vm = Throwaway::restore(&snap.dir, jailed)?;
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
fn warm_snapshot(a: &ExecArgs, kernel: &Path, initrd: &Path, jailed: bool) -> Result<WarmSnapshot, String> {
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
            let built = build_snapshot(a, kernel, initrd, &tmp, jailed)
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
/// (paused) into `out`; in the jail when `jailed`, as the clones run.
fn build_snapshot(a: &ExecArgs, kernel: &Path, initrd: &Path, out: &Path, jailed: bool) -> Result<(), String> {
    use crate::cli::{SNAPSHOT_MEMORY, SNAPSHOT_STATE};
    let mut vm = Throwaway::prepare(jailed)?;
    // Paths as the VMM sees them, and its API socket as we reach it.
    let (kernel, initrd, uds, api, state, memory, api_here) = match &vm.jail {
        Some(j) => {
            j.place(kernel, "vmlinux", false)?;
            j.place(initrd, "initrd", false)?;
            // The jail's root belongs to the jailed uid: the VMM writes
            // the snapshot there, and we move it out below.
            (
                PathBuf::from("/vmlinux"),
                PathBuf::from("/initrd"),
                PathBuf::from("/v.sock"),
                PathBuf::from("/api.sock"),
                Path::new("/").join(SNAPSHOT_STATE),
                Path::new("/").join(SNAPSHOT_MEMORY),
                j.root.join("api.sock"),
            )
        }
        None => (
            kernel.to_path_buf(),
            initrd.to_path_buf(),
            vm.uds.clone(),
            vm.dir.join("api.sock"),
            out.join(SNAPSHOT_STATE),
            out.join(SNAPSHOT_MEMORY),
            vm.dir.join("api.sock"),
        ),
    };
    let mut cmd = agent_guest_command(a, &kernel, &initrd, &uds);
    cmd.arg("--api-sock").arg(&api);
    vm.spawn(&cmd)?;
    let probe = connect_agent(&vm.uds, Instant::now() + BOOT_TIMEOUT, || vm.check_alive())?;
    drop(probe);
    // Let the guest see the probe's close and settle into idle.
    std::thread::sleep(Duration::from_millis(300));
    let call = |method: &str, path: &str, body: &str| -> Result<(), String> {
        let r = crate::api::client::request(&api_here, method, path, Some(body), Duration::from_secs(60))
            .map_err(|e| format!("the VM's API: {e}"))?;
        if r.status >= 400 {
            return Err(format!("{method} {path}: {}", r.fault()));
        }
        Ok(())
    };
    call("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    let body = serde_json::json!({
        "snapshot_type": "Full",
        "snapshot_path": state,
        "mem_file_path": memory,
    })
    .to_string();
    call("PUT", "/snapshot/create", &body)?;
    if let Some(j) = &vm.jail {
        // Out of the jail, and root's: the clones get links to these
        // files, which their jailed uid must not be able to write.
        use std::os::unix::fs::PermissionsExt;
        for f in [SNAPSHOT_STATE, SNAPSHOT_MEMORY] {
            let (from, to) = (j.root.join(f), out.join(f));
            std::os::unix::fs::chown(&from, Some(0), Some(0))
                .and_then(|()| std::fs::set_permissions(&from, std::fs::Permissions::from_mode(0o644)))
                .and_then(|()| std::fs::rename(&from, &to).or_else(|_| std::fs::copy(&from, &to).map(drop)))
                .map_err(|e| format!("moving the snapshot's {f} out of the jail: {e}"))?;
        }
    }
    Ok(())
}
