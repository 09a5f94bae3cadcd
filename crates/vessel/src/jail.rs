//! `vessel jail` (or the binary started as `jailer`): Firecracker's jailer.
//! It prepares an empty chroot for one VMM, moves into it, limits it and
//! drops every privilege, then execs the VMM:
//!
//! 1. closes inherited fds but 0-2 (with `--daemonize` they go to
//!    /dev/null) and clears the environment;
//! 2. creates `<chroot-base-dir>/<exec-file name>/<id>/root` (or uses it:
//!    an orchestrator may put kernels and disks there first), puts the
//!    exec file in with its ELF interpreter and shared libraries (from
//!    `ld.so --list`), hard-linked when the jailed uid cannot write them,
//!    else copied, so that it runs in an otherwise empty root;
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
    copy_exec_with_libraries(&a.exec_file, &root, &exec_name, a.uid)?;
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

/// Put the exec file at `<root>/<name>` and the libraries it loads at
/// their own paths under `root`, each hard-linked when it can be (see
/// [`link_or_copy`]).
fn copy_exec_with_libraries(exec: &Path, root: &Path, name: &OsStr, uid: u32) -> Result<(), String> {
    link_or_copy(exec, &root.join(name), true, uid)?;
    // A static binary has no interpreter and needs nothing else.
    let Some(interp) = elf_interpreter(exec)? else {
        return Ok(());
    };
    // What `ldd` prints, without ldd: it is a shell script that forks
    // five processes to end up running this (tens of milliseconds per
    // VM). `--list` only loads and lists, it never runs the program.
    let out = std::process::Command::new(&interp)
        .arg("--list")
        .arg(exec)
        .env_clear()
        .output()
        .map_err(|e| format!("{} --list {}: {e}", interp.display(), exec.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --list {}: {}",
            interp.display(),
            exec.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
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
        link_or_copy(Path::new(path), &target, false, uid)?;
    }
    Ok(())
}

/// Put `src` at `dest`: a hard link when that is safe and possible, else
/// a copy (mode 0755 for the `exec` file, the source's for libraries). Firecracker's jailer always copies; a link costs
/// nothing where a copy of the 40 MiB vessel binary takes 20-40 ms per
/// VM (and as much page cache). A link is the same inode, so it is used
/// only when the jailed uid cannot write that inode (not its owner, no
/// group or other write bit) and others may read it (and run it, for
/// the `exec` file); on another filesystem (EXDEV) or otherwise, it is copied.
/// Symbolic links (ld.so and libc.so.6 usually are) are followed: the
/// link is to the file itself.
fn link_or_copy(src: &Path, dest: &Path, exec: bool, uid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let src = &std::fs::canonicalize(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let meta = std::fs::metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    // An orchestrator may have put a file there; ours replaces it.
    let _ = std::fs::remove_file(dest);
    let others = if exec { 0o005 } else { 0o004 };
    let safe = meta.uid() != uid && meta.mode() & 0o022 == 0 && meta.mode() & others == others;
    if safe && std::fs::hard_link(src, dest).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dest).map_err(|e| format!("copying {} into the jail: {e}", src.display()))?;
    if exec {
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    Ok(())
}

/// The ELF interpreter (PT_INTERP) of the 64-bit little-endian `exec`,
/// or None for a static binary. Hand-read: the exec file is the trusted
/// VMM the jailer is told to run, and two header fields do not warrant an
/// ELF crate; anything unexpected is an error, not a guess.
fn elf_interpreter(exec: &Path) -> Result<Option<PathBuf>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |what: &str| format!("--exec-file {}: {what}", exec.display());
    let mut f = std::fs::File::open(exec).map_err(|e| bad(&e.to_string()))?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).map_err(|_| bad("not an ELF file"))?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    let (phoff, phentsize, phnum) = (u64_at(&eh, 0x20), u16_at(&eh, 0x36), u16_at(&eh, 0x38));
    if phentsize < 56 {
        return Err(bad("bad program header size"));
    }
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        let at = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("bad program header offset"))?;
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(&mut ph))
            .map_err(|_| bad("truncated program headers"))?;
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != PT_INTERP {
            continue;
        }
        let (offset, size) = (u64_at(&ph, 8), u64_at(&ph, 0x20));
        if size == 0 || size > 4096 {
            return Err(bad("bad PT_INTERP size"));
        }
        let mut path = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut path))
            .map_err(|_| bad("truncated PT_INTERP"))?;
        let path = path.split(|&b| b == 0).next().unwrap_or_default();
        return Ok(Some(PathBuf::from(OsStr::from_bytes(path))));
    }
    Ok(None)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_dynamic_binary_names_its_interpreter_and_other_files_are_refused() {
        let exe = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&exe).unwrap().expect("the test binary is dynamic");
        assert!(interp.is_absolute() && interp.exists(), "{}", interp.display());
        let dir = std::env::temp_dir().join(format!("jail-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("script");
        std::fs::write(&text, "#!/bin/sh\n").unwrap();
        assert!(elf_interpreter(&text).is_err());
        let mut bogus = b"\x7fELF\x02\x01".to_vec();
        bogus.resize(64, 0xff);
        std::fs::write(&text, &bogus).unwrap();
        assert!(elf_interpreter(&text).is_err(), "program headers far past the end");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file the jailed uid cannot write is linked (same inode); one it
    /// could write (other-writable, or its own) is copied, so the VMM can
    /// never change the host's file.
    #[test]
    fn files_are_linked_only_when_the_jailed_uid_cannot_write_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("jail-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src");
        std::fs::write(&src, b"vmm").unwrap();
        let me = std::fs::metadata(&src).unwrap().uid();
        let other_uid = me.wrapping_add(1);
        for (mode, exec, uid, linked) in [
            (0o755, true, other_uid, true),
            (0o644, false, other_uid, true),
            (0o644, true, other_uid, false),
            (0o757, true, other_uid, false),
            (0o775, true, other_uid, false),
            (0o755, true, me, false),
        ] {
            std::fs::set_permissions(&src, std::fs::Permissions::from_mode(mode)).unwrap();
            let dest = dir.join("dest");
            link_or_copy(&src, &dest, exec, uid).unwrap();
            let same = std::fs::metadata(&dest).unwrap().ino() == std::fs::metadata(&src).unwrap().ino();
            assert_eq!(same, linked, "mode {mode:o} exec {exec} uid {uid}");
            assert_eq!(std::fs::read(&dest).unwrap(), b"vmm");
            if exec && !linked {
                assert_eq!(std::fs::metadata(&dest).unwrap().mode() & 0o777, 0o755);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
