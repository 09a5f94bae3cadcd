//! `vessel jail` (or the binary started as `jailer`): Firecracker's jailer.
//! It prepares an empty chroot for one VMM, moves into it, limits it and
//! drops every privilege, then execs the VMM:
//!
//! 1. closes inherited fds but 0-2 (with `--daemonize` they go to
//!    /dev/null) and clears the environment;
//! 2. creates `<chroot-base-dir>/<exec-file name>/<id>/root` (or uses it:
//!    an orchestrator may put kernels and disks there first), copies the
//!    exec file in with its ELF interpreter and shared libraries (from
//!    `ldd`), so that it runs in an otherwise empty root;
//! 3. joins `--netns`, and a cgroup `<parent-cgroup>/<id>` (v2, or v1 per
//!    controller: [`cgroup`]) with the
//!    `--cgroup` values; sets the `--resource-limit`s;
//! 4. with `--new-pid-ns`, forks into a new PID namespace (the parent
//!    writes the child's pid to `<exec name>.pid` in the jail and exits);
//! 5. unshares a mount namespace, pivot_roots into the jail and detaches
//!    the old root;
//! 6. creates only /dev/kvm (when the host has it), /dev/net/tun and
//!    /dev/urandom, owned by the uid;
//! 7. drops to `--uid`/`--gid` with no supplementary groups, an empty
//!    capability bounding set, no capabilities and no_new_privs;
//! 8. execs `/<exec name>` with the arguments after `--`.
//!
//! The VMM then installs its own seccomp filters (unless `--no-seccomp`).

pub(crate) mod cgroup;

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "jailer",
    about = "Run a VMM in a chroot jail with its own namespaces, cgroup and uid"
)]
pub struct JailArgs {
    /// The VM's id: [A-Za-z0-9-], at most 64 characters.
    #[arg(long)]
    pub id: String,
    /// The VMM binary to copy into the jail and exec.
    #[arg(long)]
    pub exec_file: PathBuf,
    /// The uid the VMM runs as.
    #[arg(long)]
    pub uid: u32,
    /// The gid the VMM runs as.
    #[arg(long)]
    pub gid: u32,
    /// Where jails live: the jail is <dir>/<exec name>/<id>/root.
    #[arg(long, default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (a path, e.g. /var/run/netns/NAME).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// The cgroup version: 2 (one unified hierarchy) or 1 (one hierarchy
    /// per controller, as on hosts where v2 lacks the cpu or memory
    /// controller).
    #[arg(long, default_value_t = 2)]
    pub cgroup_version: u32,
    /// A cgroup file and the value to write, e.g. memory.max=268435456 (v2)
    /// or cpu.cfs_quota_us=50000 (v1; the prefix names the controller).
    /// Repeatable.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,
    /// The cgroup the VM's cgroup is created under [default: the exec
    /// file's name].
    #[arg(long)]
    pub parent_cgroup: Option<String>,
    /// A resource limit: fsize=BYTES or no-file=N. Repeatable [default
    /// no-file=2048, as Firecracker's jailer].
    #[arg(long = "resource-limit", value_name = "RESOURCE=VALUE")]
    pub resource_limits: Vec<String>,
    /// Detach from the terminal: a new session, stdio on /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the VMM as pid 1 of a new PID namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// The VMM's own arguments (after `--`).
    #[arg(last = true)]
    pub exec_args: Vec<String>,
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString, String> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| format!("{:?}: contains a NUL byte", p.as_ref()))
}

/// Entry point of `vessel jail` and of the binary started as `jailer`.
pub fn main_with(args: JailArgs) -> ExitCode {
    match jail(args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `jailer ARGS`: the same flags without the `jail` subcommand.
pub fn main() -> ExitCode {
    match JailArgs::try_parse() {
        Ok(a) => main_with(a),
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp) => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        Err(e) => {
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: bad arguments"));
            ExitCode::from(1)
        }
    }
}

/// What `jail` returns on success: nothing, it execs.
pub enum Never {}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(format!("--id {id:?}: use 1 to 64 characters of A-Z, a-z, 0-9 and -"));
    }
    Ok(())
}

fn parse_limit(s: &str) -> Result<(libc::__rlimit_resource_t, u64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("--resource-limit {s:?}: expected RESOURCE=VALUE"))?;
    let v: u64 = v
        .parse()
        .map_err(|_| format!("--resource-limit {s:?}: {v:?} is not a number"))?;
    let r = match k {
        "fsize" => libc::RLIMIT_FSIZE,
        "no-file" => libc::RLIMIT_NOFILE,
        _ => {
            return Err(format!(
                "--resource-limit {s:?}: unknown resource {k:?} (fsize, no-file)"
            ))
        }
    };
    Ok((r, v))
}

fn jail(a: JailArgs) -> Result<Never, String> {
    check_id(&a.id)?;
    let cgroup_version = cgroup::Version::from_flag(a.cgroup_version)?;
    let mut limits = vec![(libc::RLIMIT_NOFILE, 2048)];
    for l in &a.resource_limits {
        let (r, v) = parse_limit(l)?;
        limits.retain(|(k, _)| *k != r);
        limits.push((r, v));
    }
    let cgroup_values: Vec<(String, String)> = a
        .cgroups
        .iter()
        .map(|c| {
            let (f, v) = c
                .split_once('=')
                .ok_or_else(|| format!("--cgroup {c:?}: expected FILE=VALUE"))?;
            if f.is_empty() || f.contains('/') || f.starts_with('.') {
                return Err(format!("--cgroup {c:?}: {f:?} is not a cgroup file name"));
            }
            Ok((f.to_string(), v.to_string()))
        })
        .collect::<Result<_, String>>()?;
    let exec_name = a
        .exec_file
        .file_name()
        .ok_or_else(|| format!("--exec-file {}: not a file", a.exec_file.display()))?
        .to_owned();

    close_inherited_fds();
    // The environment goes: the VMM starts with none (our own process
    // keeps what the copy step's ldd needs through an explicit PATH).
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in keys {
        std::env::remove_var(k);
    }

    let root = a.chroot_base_dir.join(&exec_name).join(&a.id).join("root");
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    copy_exec_with_libraries(&a.exec_file, &root, &exec_name)?;
    chown(&root, a.uid, a.gid)?;

    if let Some(ns) = &a.netns {
        let f = std::fs::File::open(ns).map_err(|e| format!("--netns {}: {e}", ns.display()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace fd we opened.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(errno(&format!("--netns {}", ns.display())));
        }
    }

    let parent = a
        .parent_cgroup
        .clone()
        .unwrap_or_else(|| exec_name.to_string_lossy().into_owned());
    cgroup::join(cgroup_version, &parent, &a.id, &cgroup_values)?;

    for (r, v) in &limits {
        let lim = libc::rlimit {
            rlim_cur: *v,
            rlim_max: *v,
        };
        // SAFETY: a valid rlimit struct.
        if unsafe { libc::setrlimit(*r, &lim) } != 0 {
            return Err(errno("setrlimit"));
        }
    }

    if a.daemonize {
        daemonize()?;
    }
    if a.new_pid_ns {
        // SAFETY: unshare with a plain flag; the next fork's child is pid 1
        // of the new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(errno("unshare(CLONE_NEWPID)"));
        }
        // SAFETY: the process is single-threaded here; the parent only
        // writes a file and exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(errno("fork"));
        }
        if pid > 0 {
            let pid_file = root.join(format!("{}.pid", exec_name.to_string_lossy()));
            let _ = std::fs::write(&pid_file, format!("{pid}\n"));
            std::process::exit(0);
        }
    }

    note_host_kvm();
    enter_root(&root)?;
    make_devices(a.uid, a.gid)?;
    drop_privileges(a.uid, a.gid)?;

    let exe = Path::new("/").join(&exec_name);
    let mut argv: Vec<CString> = vec![cstr(&exec_name)?];
    if exec_name == "firecracker" {
        // Firecracker's jailer hands the id on.
        argv.push(cstr("--id")?);
        argv.push(cstr(&a.id)?);
    }
    for x in &a.exec_args {
        argv.push(cstr(x)?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let exe_c = cstr(&exe)?;
    // SAFETY: NUL-terminated argv and envp of valid C strings that outlive
    // the call; execve returns only on failure.
    unsafe { libc::execve(exe_c.as_ptr(), argv_ptrs.as_ptr(), envp.as_ptr()) };
    Err(errno(&format!("exec {}", exe.display())))
}

fn close_inherited_fds() {
    // SAFETY: close_range closes fds 3 and up; std holds none of them here.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc != 0 {
        for fd in 3..1024 {
            // SAFETY: closing fds we do not use (EBADF is fine).
            unsafe { libc::close(fd) };
        }
    }
}

fn chown(p: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", p.display()))
}

/// Copy the exec file to `<root>/<name>` and the libraries `ldd` names to
/// their own paths under `root`.
fn copy_exec_with_libraries(exec: &Path, root: &Path, name: &OsStr) -> Result<(), String> {
    let dest = root.join(name);
    std::fs::copy(exec, &dest).map_err(|e| format!("copying {} into the jail: {e}", exec.display()))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    let out = std::process::Command::new("/usr/bin/ldd")
        .arg(exec)
        .env("PATH", "/usr/bin:/bin")
        .output()
        .map_err(|e| format!("ldd {}: {e}", exec.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(());
    }
    if !out.status.success() {
        return Err(format!(
            "ldd {}: {}",
            exec.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let target = root.join(path.trim_start_matches('/'));
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::copy(path, &target).map_err(|e| format!("copying {path} into the jail: {e}"))?;
    }
    Ok(())
}

fn daemonize() -> Result<(), String> {
    // SAFETY: setsid has no arguments; it fails only for a group leader,
    // which keeps its session (as Firecracker's jailer).
    unsafe { libc::setsid() };
    let null = cstr("/dev/null")?;
    // SAFETY: open and dup2 on a path we own; fds 0-2 are replaced.
    unsafe {
        let fd = libc::open(null.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return Err(errno("/dev/null"));
        }
        for target in 0..3 {
            libc::dup2(fd, target);
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
    Ok(())
}

/// A new mount namespace whose root is the jail.
fn enter_root(root: &Path) -> Result<(), String> {
    let root_c = cstr(root)?;
    let dot = cstr(".")?;
    let old = cstr("old_root")?;
    let slash = cstr("/")?;
    // SAFETY: namespace and mount calls with valid C strings; each result
    // is checked.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(errno("unshare(CLONE_NEWNS)"));
        }
        // Nothing we mount from now on propagates back to the host.
        if libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(errno("making / a slave mount"));
        }
        // pivot_root needs the new root to be a mount point.
        if libc::mount(
            root_c.as_ptr(),
            root_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(errno("bind-mounting the jail"));
        }
        if libc::chdir(root_c.as_ptr()) != 0 {
            return Err(errno("chdir into the jail"));
        }
        let _ = std::fs::create_dir("old_root");
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old.as_ptr()) != 0 {
            return Err(errno("pivot_root"));
        }
        if libc::chdir(slash.as_ptr()) != 0 {
            return Err(errno("chdir /"));
        }
        if libc::umount2(old.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(errno("detaching the old root"));
        }
    }
    std::fs::remove_dir("/old_root").map_err(|e| format!("/old_root: {e}"))?;
    Ok(())
}

/// /dev/kvm (when the host has it), /dev/net/tun and /dev/urandom, owned
/// by the VMM's uid. Called inside the jail.
fn make_devices(uid: u32, gid: u32) -> Result<(), String> {
    std::fs::create_dir_all("/dev/net").map_err(|e| format!("/dev/net: {e}"))?;
    let kvm = host_has_kvm();
    let mut nodes = vec![("/dev/net/tun", 10, 200), ("/dev/urandom", 1, 9)];
    if kvm {
        nodes.push(("/dev/kvm", 10, 232));
    }
    for (path, major, minor) in nodes {
        let _ = std::fs::remove_file(path);
        let p = cstr(path)?;
        // SAFETY: mknod of a character device at a path in the jail.
        if unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o660, libc::makedev(major, minor)) } != 0 {
            return Err(errno(&format!("mknod {path}")));
        }
        chown(Path::new(path), uid, gid)?;
    }
    Ok(())
}

static HOST_KVM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn host_has_kvm() -> bool {
    HOST_KVM.load(std::sync::atomic::Ordering::Relaxed)
}

/// Record, before the pivot, whether the host has /dev/kvm.
fn note_host_kvm() {
    HOST_KVM.store(Path::new("/dev/kvm").exists(), std::sync::atomic::Ordering::Relaxed);
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    // SAFETY: credential and prctl calls with plain integer arguments;
    // each result is checked.
    unsafe {
        // Empty the bounding set while we still may (CAP_SETPCAP).
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) == 1 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(errno("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(errno("setresgid"));
        }
        // Leaving uid 0 clears the permitted and effective sets.
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(errno("setresuid"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(errno("no_new_privs"));
        }
    }
    Ok(())
}
