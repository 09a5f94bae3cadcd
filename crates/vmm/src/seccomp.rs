//! Seccomp filters, one allow-list per kind of thread, built with
//! seccompiler.
//!
//! Each thread calls [`enter`] with its [`ThreadKind`] before it runs guest
//! code or reads a request; it is a no-op until the binary calls
//! [`enable`] (`vessel run` does unless `--no-seccomp`; library tests run
//! without filters). A call outside the list raises SIGSYS
//! (`SECCOMP_RET_TRAP`, as Firecracker and Cloud Hypervisor do); the handler
//! writes the thread kind and the syscall's number and name to stderr, and
//! the process exits with code 148 (Firecracker's exit code for a bad
//! syscall).
//!
//! Filters stack: a thread created by a filtered thread keeps its parent's
//! filter under its own, so it can only make calls both allow. Hence a kind
//! that starts threads of another kind includes that kind's list:
//! - the VMM (main/control) thread starts everything: its list is the union
//!   of all lists plus its own (files, sockets, TAP and KVM set-up);
//! - a vCPU starts virtio device workers when the guest activates a device,
//!   so the vCPU list includes the worker list.
//!
//! To extend (for example migration's socket threads): add a kind, its list
//! in [`own_syscalls`], and call [`enter`] at the top of the thread. The
//! lists were found by running real workloads under `strace -f`
//! (scripts/seccomp-trace; docs/SECURITY.md says how).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Exit code after a forbidden syscall (Firecracker's
/// `FC_EXIT_CODE_BAD_SYSCALL`).
pub const BAD_SYSCALL_EXIT: i32 = 148;

/// The kinds of thread, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: control loop, configuration, snapshots, the VM's
    /// run thread (it starts the vCPUs) and the signal thread.
    Vmm,
    /// The API server (hyper on a Unix socket).
    Api,
    /// A vCPU (emu or kvm engine).
    Vcpu,
    /// A virtio device worker (block, net, rng, console, vsock queues).
    Worker,
    /// Serial console plumbing: the console socket server, its readers,
    /// standard input.
    Console,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::Worker,
        ThreadKind::Console,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Worker => "device worker",
            ThreadKind::Console => "console",
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter for the {0} thread: {1}")]
    Build(&'static str, String),
    #[error("installing the seccomp filter of the {0} thread: {1}")]
    Install(&'static str, String),
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name))),*]
    };
}

type List = &'static [(libc::c_long, &'static str)];

/// What every thread needs: the allocator, locks, time, thread exit,
/// signal return, and writing to stderr (logging, the SIGSYS report).
/// restart_syscall: the kernel resumes an interrupted sleep with it after
/// SIGSTOP/SIGCONT (job control, a debugger), so a stopped VMM survives.
const COMMON: List = syscalls!(
    SYS_restart_syscall,
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_futex,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettid,
    SYS_getpid,
    SYS_getrandom,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_tgkill,
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_exit,
    SYS_exit_group,
);

/// Starting a thread (glibc's pthread_create, and Rust's thread start-up,
/// which looks at the SIGSEGV handler for its stack guard) that then
/// installs its own filter: seccomp (adding a filter only ever narrows what
/// is allowed) and prctl (no_new_privs, the name). The new thread makes
/// these calls under its parent's filter.
const THREAD_START: List = syscalls!(
    SYS_rt_sigaction,
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_seccomp,
);

/// The calls of each kind of its own (before the stacking rule).
fn own_syscalls(kind: ThreadKind) -> &'static [List] {
    match kind {
        ThreadKind::Worker => &[syscalls!(
            // epoll loop on the queue eventfds and the stop eventfd
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_epoll_ctl,
            SYS_read,
            SYS_readv,
            // block devices: raw and qcow2 images
            SYS_pread64,
            SYS_pwrite64,
            SYS_preadv,
            SYS_pwritev,
            SYS_preadv2,
            SYS_pwritev2,
            SYS_lseek,
            SYS_fsync,
            SYS_fdatasync,
            SYS_fallocate,
            SYS_ftruncate,
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            // virtio-console output file (its cap checks the size)
            SYS_fcntl,
            SYS_ioctl,
            // virtio-vsock: host Unix sockets (accept on uds_path, connect
            // to uds_path_PORT, half-close)
            SYS_socket,
            SYS_connect,
            SYS_accept4,
            SYS_shutdown,
            SYS_recvfrom,
            SYS_sendto,
        )],
        ThreadKind::Vcpu => &[
            syscalls!(
                // KVM_RUN and the kvm engine's other vCPU ioctls
                SYS_ioctl,
                SYS_read,
                // a device activated by the guest: its eventfds, epoll
                SYS_eventfd2,
                SYS_epoll_create1,
                SYS_epoll_ctl,
                SYS_fcntl,
                SYS_dup,
                // halt: wait for the next interrupt
                SYS_ppoll,
                SYS_poll,
                // serial output to `vessel console` clients' sockets
                SYS_sendto,
                // the virtio-console output cap looks at its file
                SYS_statx,
                SYS_fstat,
                SYS_newfstatat,
            ),
            THREAD_START,
        ],
        ThreadKind::Api => &[syscalls!(
            SYS_accept4,
            SYS_read,
            SYS_recvfrom,
            SYS_recvmsg,
            SYS_sendto,
            SYS_sendmsg,
            SYS_shutdown,
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_epoll_ctl,
            SYS_ioctl,
            SYS_fcntl,
            SYS_getsockopt,
            SYS_getsockname,
            SYS_getpeername,
        )],
        ThreadKind::Console => &[
            syscalls!(
                SYS_accept4,
                SYS_accept,
                SYS_read,
                // console socket clients (std reads a socket with recv)
                SYS_recvfrom,
                SYS_sendto,
                SYS_setsockopt,
                SYS_fcntl,
                SYS_ioctl,
                SYS_poll,
                SYS_ppoll,
            ),
            THREAD_START,
        ],
        ThreadKind::Vmm => &[
            syscalls!(
                // files: kernels, disks, snapshots, logs, metrics
                SYS_openat,
                SYS_open,
                SYS_read,
                SYS_readv,
                SYS_pread64,
                SYS_pwrite64,
                SYS_preadv,
                SYS_pwritev,
                SYS_lseek,
                SYS_fstat,
                SYS_fstatfs,
                SYS_newfstatat,
                SYS_statx,
                SYS_stat,
                SYS_lstat,
                SYS_readlink,
                SYS_getdents64,
                SYS_mkdir,
                SYS_mkdirat,
                SYS_unlink,
                SYS_unlinkat,
                SYS_rmdir,
                SYS_rename,
                SYS_renameat,
                SYS_renameat2,
                SYS_ftruncate,
                SYS_fallocate,
                SYS_fsync,
                SYS_fdatasync,
                SYS_flock,
                SYS_fcntl,
                SYS_dup,
                SYS_dup3,
                SYS_pipe2,
                SYS_memfd_create,
                SYS_getcwd,
                SYS_umask,
                SYS_fchmod,
                SYS_access,
                SYS_faccessat,
                SYS_faccessat2,
                // sockets: the API and console sockets, TAP set-up
                SYS_socket,
                SYS_bind,
                SYS_listen,
                SYS_connect,
                SYS_setsockopt,
                // KVM, TAP and terminal ioctls
                SYS_ioctl,
                // signals, the signal thread
                SYS_rt_sigaction,
                SYS_rt_sigtimedwait,
                SYS_kill,
                // time and process facts
                SYS_getuid,
                SYS_geteuid,
                SYS_getgid,
                SYS_getegid,
                SYS_getppid,
                SYS_uname,
                SYS_sysinfo,
                SYS_getrlimit,
                SYS_prlimit64,
                SYS_sched_setaffinity,
                SYS_wait4,
            ),
            THREAD_START,
        ],
    }
}

/// The full list of `kind`, after the stacking rule (see the module docs).
pub fn allowed(kind: ThreadKind) -> Vec<(libc::c_long, &'static str)> {
    let mut lists: Vec<List> = vec![COMMON];
    lists.extend(own_syscalls(kind).iter().copied());
    match kind {
        ThreadKind::Vmm => {
            for k in ThreadKind::ALL {
                if k != ThreadKind::Vmm {
                    lists.extend(own_syscalls(k).iter().copied());
                }
            }
        }
        ThreadKind::Vcpu => lists.extend(own_syscalls(ThreadKind::Worker).iter().copied()),
        _ => {}
    }
    let mut all: Vec<_> = lists.into_iter().flatten().copied().collect();
    all.sort();
    all.dedup();
    all
}

/// An ioctl request a thread may make: one number, or every request of
/// one ioctl type (the `_IOC` type byte, bits 8..16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ioctl {
    Request(u32, &'static str),
    Type(u8, &'static str),
}

/// `ioctl` on the file descriptors std sets up itself: non-blocking mode
/// (std's `set_nonblocking` is FIONBIO on Linux), close-on-exec, bytes
/// readable; and the read-only terminal queries of `isatty` (a logger
/// deciding on colours) and of a terminal's size.
const FD_IOCTLS: &[Ioctl] = &[
    Ioctl::Request(libc::TCGETS as u32, "TCGETS"),
    Ioctl::Request(libc::TIOCGWINSZ as u32, "TIOCGWINSZ"),
    Ioctl::Request(libc::FIONBIO as u32, "FIONBIO"),
    Ioctl::Request(libc::FIOCLEX as u32, "FIOCLEX"),
    Ioctl::Request(libc::FIONCLEX as u32, "FIONCLEX"),
    Ioctl::Request(libc::FIONREAD as u32, "FIONREAD"),
];

/// `_IOR(0x12, 114, u64)`, which the libc crate does not name.
const BLKGETSIZE64: u32 = 0x8008_1272;

/// imago asks a block device for its size and sector size.
const BLOCK_DEVICE_IOCTLS: &[Ioctl] = &[
    Ioctl::Request(libc::BLKSSZGET as u32, "BLKSSZGET"),
    Ioctl::Request(BLKGETSIZE64, "BLKGETSIZE64"),
];

/// /dev/kvm, the VM and vCPU fds: every request of KVM's type (0xAE).
const KVM_IOCTLS: &[Ioctl] = &[Ioctl::Type(0xae, "KVM")];

/// `vessel run`'s terminal: raw mode for the serial console.
const TERMINAL_IOCTLS: &[Ioctl] = &[
    Ioctl::Request(libc::TCSETS as u32, "TCSETS"),
    Ioctl::Request(libc::TCSETSW as u32, "TCSETSW"),
    Ioctl::Request(libc::TCSETSF as u32, "TCSETSF"),
];

/// Attaching a TAP (crates/vmm/src/virtio/tap.rs).
const TAP_IOCTLS: &[Ioctl] = &[Ioctl::Request(0x4004_54ca, "TUNSETIFF")];

/// The ioctl requests of each kind of its own (before the stacking rule).
/// Firecracker filters ioctl by request too: a guest that took over a
/// thread must not reach TIOCSTI, network or file-system ioctls.
fn own_ioctls(kind: ThreadKind) -> &'static [&'static [Ioctl]] {
    match kind {
        ThreadKind::Worker => &[FD_IOCTLS, BLOCK_DEVICE_IOCTLS],
        ThreadKind::Vcpu => &[FD_IOCTLS, KVM_IOCTLS],
        ThreadKind::Api => &[FD_IOCTLS],
        ThreadKind::Console => &[FD_IOCTLS, TERMINAL_IOCTLS],
        ThreadKind::Vmm => &[FD_IOCTLS, BLOCK_DEVICE_IOCTLS, KVM_IOCTLS, TERMINAL_IOCTLS, TAP_IOCTLS],
    }
}

/// The ioctl requests `kind` may make, after the stacking rule (as
/// [`allowed`] does for the calls).
fn allowed_ioctls(kind: ThreadKind) -> Vec<Ioctl> {
    let kinds: Vec<ThreadKind> = match kind {
        ThreadKind::Vmm => ThreadKind::ALL.to_vec(),
        ThreadKind::Vcpu => vec![ThreadKind::Vcpu, ThreadKind::Worker],
        k => vec![k],
    };
    let mut all: Vec<Ioctl> = Vec::new();
    for k in kinds {
        for i in own_ioctls(k).iter().flat_map(|l| l.iter()) {
            if !all.contains(i) {
                all.push(*i);
            }
        }
    }
    all
}

/// The `fcntl` commands any thread may use: descriptor and status flags
/// (std's `try_clone`, close-on-exec, non-blocking mode), record locks
/// (imago locks images with open file description locks) and memfd seals.
/// Left out are the commands that reach beyond the file: signal delivery
/// to another process (F_SETOWN, F_SETSIG), leases and directory
/// notifications. scripts/seccomp-trace lists the commands a workload uses.
const FCNTL_COMMANDS: &[(libc::c_int, &str)] = &[
    (libc::F_DUPFD, "F_DUPFD"),
    (libc::F_DUPFD_CLOEXEC, "F_DUPFD_CLOEXEC"),
    (libc::F_GETFD, "F_GETFD"),
    (libc::F_SETFD, "F_SETFD"),
    (libc::F_GETFL, "F_GETFL"),
    (libc::F_SETFL, "F_SETFL"),
    (libc::F_GETLK, "F_GETLK"),
    (libc::F_SETLK, "F_SETLK"),
    (libc::F_SETLKW, "F_SETLKW"),
    (libc::F_OFD_GETLK, "F_OFD_GETLK"),
    (libc::F_OFD_SETLK, "F_OFD_SETLK"),
    (libc::F_OFD_SETLKW, "F_OFD_SETLKW"),
    (libc::F_ADD_SEALS, "F_ADD_SEALS"),
    (libc::F_GET_SEALS, "F_GET_SEALS"),
];

/// Calls a kind may make only with some arguments (none: any).
/// - Device workers (and the vCPUs that start them) may create Unix
///   sockets only, for vsock's host connections: never an IP socket.
/// - `ioctl` is allowed only with the requests in [`own_ioctls`].
/// - `fcntl` only with the commands in [`FCNTL_COMMANDS`].
fn argument_rules(
    kind: ThreadKind,
    nr: libc::c_long,
) -> Result<Vec<seccompiler::SeccompRule>, seccompiler::BackendError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    if nr == libc::SYS_socket && kind != ThreadKind::Vmm {
        let unix_only = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?;
        return Ok(vec![SeccompRule::new(vec![unix_only])?]);
    }
    if nr == libc::SYS_fcntl {
        return FCNTL_COMMANDS
            .iter()
            .map(|&(cmd, _)| {
                let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd as u64)?;
                SeccompRule::new(vec![cond])
            })
            .collect();
    }
    if nr == libc::SYS_ioctl {
        // The request is an unsigned int in the kernel (the upper half of
        // the register is ignored), so compare 32 bits.
        return allowed_ioctls(kind)
            .into_iter()
            .map(|i| {
                let cond = match i {
                    Ioctl::Request(n, _) => {
                        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, n.into())?
                    }
                    Ioctl::Type(t, _) => SeccompCondition::new(
                        1,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::MaskedEq(0xff00),
                        u64::from(t) << 8,
                    )?,
                };
                SeccompRule::new(vec![cond])
            })
            .collect();
    }
    Ok(Vec::new())
}

/// Compile the filter of `kind`.
pub fn build(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|(nr, _)| Ok((nr, argument_rules(kind, nr)?)))
        .collect::<Result<_, seccompiler::BackendError>>()
        .map_err(|e| SeccompError::Build(kind.name(), e.to_string()))?;
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SeccompError::Build(kind.name(), e.to_string()))?;
    // VESSEL_SECCOMP=log: calls outside the list are allowed and logged
    // by the kernel (SECCOMP_RET_LOG), for finding what a list lacks
    // (scripts/seccomp-trace).
    let mismatch = if std::env::var_os("VESSEL_SECCOMP").is_some_and(|v| v == "log") {
        SeccompAction::Log
    } else {
        SeccompAction::Trap
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| SeccompError::Build(kind.name(), e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| SeccompError::Build(kind.name(), e.to_string()))
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static FILTERS: OnceLock<Vec<(ThreadKind, BpfProgram)>> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the SIGSYS report (const: readable from a
    /// signal handler without allocation).
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Turn filtering on for this process: compile every filter and install
/// the SIGSYS handler. Threads then filter themselves in [`enter`].
pub fn enable() -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    // glibc's malloc opens files on a thread's behalf: on a new thread's
    // first allocation it reads /sys/devices/system/cpu/online to size its
    // arena limit, and shrinking a thread arena's heap reads
    // /proc/sys/vm/overcommit_memory. With one arena (the brk heap) it does
    // neither, so no filtered thread needs openat for the allocator (and
    // the VMM keeps one heap, not one per thread).
    // SAFETY: mallopt with a plain integer option, before other threads.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let mut built = Vec::new();
    for k in ThreadKind::ALL {
        built.push((k, build(k)?));
    }
    let _ = FILTERS.set(built);
    ENABLED.store(true, Ordering::Release);
    Ok(())
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Install `kind`'s filter on the calling thread (when enabled). A thread
/// that cannot be filtered must not go on: the process exits.
pub fn enter(kind: ThreadKind) {
    if !enabled() {
        return;
    }
    if let Err(e) = install(kind) {
        eprintln!("vessel: {e}");
        std::process::exit(1);
    }
}

/// Install `kind`'s filter on the calling thread, whether or not filtering
/// is enabled.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    match FILTERS.get().and_then(|f| f.iter().find(|(k, _)| *k == kind)) {
        Some((_, p)) => install_program(kind, p),
        None => install_program(kind, &build(kind)?),
    }
}

/// Install a filter built by [`build`] (without allocating: tests call it
/// in a forked child).
pub fn install_program(kind: ThreadKind, prog: &BpfProgram) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    KIND.with(|c| c.set(kind as u8));
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install(kind.name(), e.to_string()))
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting value; the handler is
    // an `extern "C"` function with the SA_SIGINFO signature.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = sigsys_handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Names for the report of calls no list allows.
const EXTRA_NAMES: List = syscalls!(
    SYS_execve,
    SYS_execveat,
    SYS_fork,
    SYS_vfork,
    SYS_ptrace,
    SYS_mount,
    SYS_umount2,
    SYS_setuid,
    SYS_setgid,
    SYS_chroot,
    SYS_pivot_root,
    SYS_unshare,
    SYS_setns,
    SYS_init_module,
    SYS_finit_module,
    SYS_bpf,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_socketpair,
    SYS_chmod,
    SYS_chown,
    SYS_symlink,
    SYS_link,
    SYS_personality,
    SYS_getpriority,
    SYS_setpriority,
    SYS_mlock,
    SYS_getitimer,
    SYS_alarm,
    SYS_pause,
);

/// Appends `s` to `buf` at `*at` (no allocation: used in a signal handler).
fn put(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &b in s {
        if *at < buf.len() {
            buf[*at] = b;
            *at += 1;
        }
    }
}

fn put_num(buf: &mut [u8], at: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(buf, at, &digits[i..]);
}

extern "C" fn sigsys_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills `si_syscall`, an int at byte 24
    // of siginfo_t on x86-64 (after signo, errno, code, padding and
    // si_call_addr); `info` points to the kernel's siginfo.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let kind = KIND.with(|c| c.get());
    let kind_name = ThreadKind::ALL
        .iter()
        .find(|k| **k as u8 == kind)
        .map(|k| k.name())
        .unwrap_or("unfiltered");
    let mut buf = [0u8; 256];
    let mut at = 0;
    put(&mut buf, &mut at, b"vessel: seccomp: the ");
    put(&mut buf, &mut at, kind_name.as_bytes());
    put(&mut buf, &mut at, b" thread made syscall ");
    put_num(&mut buf, &mut at, nr as u64);
    // The name table is static data: no allocation here.
    if let Some(name) = syscall_name(nr as libc::c_long) {
        put(&mut buf, &mut at, b" (");
        put(&mut buf, &mut at, name.as_bytes());
        put(&mut buf, &mut at, b")");
    }
    put(&mut buf, &mut at, b", which its allow-list forbids; exiting\n");
    // SAFETY: write and _exit are async-signal-safe; buf outlives the call.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), at);
        libc::_exit(BAD_SYSCALL_EXIT);
    }
}

/// The name of syscall `nr`, if it is one this module knows (static
/// tables only: the SIGSYS handler calls it).
pub fn syscall_name(nr: libc::c_long) -> Option<&'static str> {
    ThreadKind::ALL
        .iter()
        .flat_map(|&k| own_syscalls(k).iter())
        .chain([COMMON, THREAD_START, EXTRA_NAMES].iter())
        .flat_map(|l| l.iter())
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` in a forked child with `kind`'s filter (built here, before
    /// the fork); its wait status and what it wrote to stderr.
    fn in_child(kind: ThreadKind, f: impl FnOnce()) -> (libc::c_int, String) {
        let prog = build(kind).unwrap();
        let mut fds = [0; 2];
        // SAFETY: fds is an array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only installs a prebuilt filter, makes
        // syscalls and exits; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: plain fd calls on the pipe we made; _exit leaves the
            // child without running the parent's destructors.
            unsafe {
                libc::dup2(fds[1], 2);
                if install_program(kind, &prog).is_err() {
                    libc::_exit(3);
                }
            }
            f();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(fds[1]) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        use std::io::Read;
        use std::os::fd::FromRawFd;
        let mut err = String::new();
        // SAFETY: we own the read end; File closes it.
        let _ = unsafe { std::fs::File::from_raw_fd(fds[0]) }.read_to_string(&mut err);
        (status, err)
    }

    fn died_of_bad_syscall(status: libc::c_int) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == BAD_SYSCALL_EXIT
    }

    #[test]
    fn each_filter_kills_a_call_outside_its_list() {
        for kind in ThreadKind::ALL {
            // Every list leaves out ptrace, execve and mount.
            for (nr, name) in [
                (libc::SYS_ptrace, "ptrace"),
                (libc::SYS_execve, "execve"),
                (libc::SYS_mount, "mount"),
            ] {
                assert!(allowed(kind).iter().all(|(n, _)| *n != nr), "{kind:?} allows {name}");
                let (status, err) = in_child(kind, || {
                    // SAFETY: a raw syscall with harmless (invalid) arguments;
                    // the filter traps it before the kernel looks at them.
                    unsafe { libc::syscall(nr, 0, 0, 0, 0, 0) };
                });
                assert!(
                    died_of_bad_syscall(status),
                    "{kind:?} with {name}: child status {status:#x}, not exit {BAD_SYSCALL_EXIT}; {err}"
                );
                let want = format!("the {} thread made syscall {nr} ({name})", kind.name());
                assert!(err.contains(&want), "{kind:?}: the report {err:?} lacks {want:?}");
            }
        }
    }

    #[test]
    fn each_filter_kills_on_its_own_neighbours_calls() {
        // A worker may not open files or create IP sockets (Unix ones
        // only, for vsock); the API thread may not open or write files; a
        // vCPU may not open files or IP sockets.
        let inet = libc::AF_INET as libc::c_long;
        for (kind, nr, arg0) in [
            (ThreadKind::Worker, libc::SYS_openat, 0),
            (ThreadKind::Worker, libc::SYS_socket, inet),
            (ThreadKind::Api, libc::SYS_openat, 0),
            (ThreadKind::Api, libc::SYS_pwrite64, 0),
            (ThreadKind::Console, libc::SYS_openat, 0),
            (ThreadKind::Vcpu, libc::SYS_openat, 0),
            (ThreadKind::Vcpu, libc::SYS_socket, inet),
        ] {
            let (status, err) = in_child(kind, || {
                // SAFETY: as above; the call is trapped.
                unsafe { libc::syscall(nr, arg0, 0, 0, 0, 0) };
            });
            assert!(
                died_of_bad_syscall(status),
                "{kind:?} with syscall {nr}: child status {status:#x}; {err}"
            );
        }
    }

    #[test]
    fn allowed_calls_pass() {
        for kind in ThreadKind::ALL {
            let (status, err) = in_child(kind, || {
                let _ = std::time::Instant::now();
                let v: Vec<u8> = vec![0; 1 << 20];
                drop(v);
                // SAFETY: getpid has no arguments.
                unsafe { libc::getpid() };
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: {status:#x}; {err}"
            );
        }
    }
    #[test]
    fn ioctl_is_limited_to_each_kinds_requests() {
        // TIOCSTI (push bytes into a terminal's input) is on no list; a TAP
        // ioctl only on the VMM's; KVM's only where the kvm engine runs.
        let tiocsti = libc::TIOCSTI as libc::c_long;
        let tunsetiff: libc::c_long = 0x4004_54ca;
        let kvm_run: libc::c_long = 0xae80;
        let mut refused: Vec<(ThreadKind, libc::c_long)> = ThreadKind::ALL.iter().map(|k| (*k, tiocsti)).collect();
        for k in [
            ThreadKind::Api,
            ThreadKind::Vcpu,
            ThreadKind::Worker,
            ThreadKind::Console,
        ] {
            refused.push((k, tunsetiff));
        }
        for k in [ThreadKind::Api, ThreadKind::Worker, ThreadKind::Console] {
            refused.push((k, kvm_run));
        }
        for k in [ThreadKind::Api, ThreadKind::Worker, ThreadKind::Vcpu] {
            refused.push((k, libc::TCSETS as libc::c_long));
        }
        for (kind, request) in refused {
            let (status, err) = in_child(kind, || {
                // SAFETY: ioctl on an invalid fd; the filter traps it first.
                unsafe { libc::syscall(libc::SYS_ioctl, -1, request, 0) };
            });
            assert!(
                died_of_bad_syscall(status),
                "{kind:?} with ioctl {request:#x}: child status {status:#x}; {err}"
            );
        }
        // Allowed ones reach the kernel (and fail there: EBADF).
        for (kind, request) in [
            (ThreadKind::Api, libc::FIONBIO as libc::c_long),
            (ThreadKind::Worker, BLKGETSIZE64 as libc::c_long),
            (ThreadKind::Vcpu, kvm_run),
            (ThreadKind::Vcpu, libc::FIONBIO as libc::c_long),
            (ThreadKind::Console, libc::TCSETS as libc::c_long),
            (ThreadKind::Worker, libc::TCGETS as libc::c_long),
            (ThreadKind::Vmm, tunsetiff),
            (ThreadKind::Vmm, kvm_run),
            (ThreadKind::Vmm, libc::TCSETS as libc::c_long),
        ] {
            let (status, err) = in_child(kind, || {
                // SAFETY: ioctl on an invalid fd fails with EBADF.
                unsafe { libc::syscall(libc::SYS_ioctl, -1, request, 0) };
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?} with ioctl {request:#x}: {status:#x}; {err}"
            );
        }
    }

    #[test]
    fn fcntl_is_limited_to_file_commands() {
        // F_SETOWN would have SIGIO sent to another process; no kind may.
        for kind in ThreadKind::ALL {
            let (status, err) = in_child(kind, || {
                // SAFETY: fcntl on an invalid fd; the filter traps it first.
                unsafe { libc::syscall(libc::SYS_fcntl, -1, libc::F_SETOWN, 1) };
            });
            assert!(
                died_of_bad_syscall(status),
                "{kind:?} with F_SETOWN: child status {status:#x}; {err}"
            );
            // What std and imago use reaches the kernel.
            let (status, err) = in_child(kind, || {
                use std::os::fd::AsFd;
                // std's try_clone: F_DUPFD_CLOEXEC.
                let _ = std::io::stderr().as_fd().try_clone_to_owned();
                for &(cmd, _) in FCNTL_COMMANDS {
                    // SAFETY: fcntl on an invalid fd fails with EBADF.
                    unsafe { libc::syscall(libc::SYS_fcntl, -1, cmd, 0) };
                }
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: {status:#x}; {err}"
            );
        }
    }

    #[test]
    fn workers_make_unix_sockets() {
        // vsock's worker connects to host listeners at uds_path_PORT.
        for kind in [ThreadKind::Worker, ThreadKind::Vcpu] {
            let (status, err) = in_child(kind, || {
                let _ = std::os::unix::net::UnixStream::connect("/nonexistent/vessel-vsock");
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: {status:#x}; {err}"
            );
        }
    }
}
