//! The `vessel` command line: `run` starts a VM (in the foreground, or
//! detached with a name); `ps`, `pause`, `resume`, `stop`, `kill`,
//! `inspect`, `logs` and `console` are clients of each named VM's own API
//! and console sockets, so there is no daemon.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::api::client;
use crate::launch::{ConsoleMode, Launch};
use crate::{config, device_args, disk_cmd, fc, runtime};

/// How long the CLI waits for a VM's API.
const API_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(name = "vessel", version, about = "Vessel virtual machine monitor")]
struct Cli {
    /// More logging (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest: with its serial console on the terminal (Ctrl-A x
    /// quits), or detached (--name N --detach); with --api-sock and no
    /// kernel, wait for configuration over Firecracker's API.
    Run(Box<RunArgs>),
    /// List the named VMs on this host.
    Ps,
    /// Pause a VM: vCPUs and devices stop; memory and device state hold still.
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Stop a VM cleanly (disks flushed); SIGKILL after --timeout seconds.
    Stop {
        name: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Kill a VM's process at once (SIGKILL).
    Kill { name: String },
    /// A VM's configuration and state, as JSON.
    Inspect { name: String },
    /// A VM's serial console output so far; -f follows it.
    Logs {
        name: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Attach the terminal to a VM's serial console (Ctrl-A d detaches).
    Console { name: String },
    /// Snapshot a running VM into DIR (it is paused for the snapshot and
    /// resumed after, unless --leave-paused); `snapshot inspect FILE`
    /// describes a snapshot.
    Snapshot(SnapshotArgs),
    /// Start new VMs from a snapshot directory (detached, named).
    Restore {
        dir: PathBuf,
        /// The new VM's name [default: the directory's name and a number].
        #[arg(long)]
        name: Option<String>,
        /// How many clones to start (named NAME-1, NAME-2, ... when more than one).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The engine to restore under [default: the snapshot's].
        #[arg(long)]
        accel: Option<String>,
        /// Leave the restored VMs paused.
        #[arg(long)]
        paused: bool,
        /// A vsock socket of each clone's own in place of the snapshot's
        /// (the API's `vsock_override`); `{name}` in PATH becomes the
        /// clone's name, and is needed with --count above 1.
        #[arg(long, value_name = "PATH")]
        vsock_uds: Option<String>,
    },
    /// Create, inspect, snapshot and convert disk images.
    Disk(disk_cmd::DiskArgs),
    /// Migrate a running VM to another Vessel (started with `vessel run
    /// --incoming URL`), showing its progress; the VM here ends once the
    /// destination runs it.
    Migrate(crate::migration::MigrateArgs),
    /// Protect a running VM with a standby (started with `vessel run
    /// --standby URL`): continuous checkpoints, held console output, and
    /// a takeover by the standby when this host dies (docs/FAILOVER.md).
    Protect(crate::failover::ProtectArgs),
    /// Run one command in a throwaway VM (the default guest and its
    /// agent), or in the running VM NAME, passing stdin, stdout, stderr,
    /// signals and the exit status through: `vessel exec [NAME] -- CMD ARGS...`.
    Exec(Box<crate::exec::ExecArgs>),
    /// Run a VMM in a chroot jail as an unprivileged uid, with its own
    /// mount (and PID) namespace, netns, cgroup and rlimits: Firecracker's
    /// jailer and its flags (also when started as `jailer`).
    Jail(crate::jail::JailArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    inspect: Option<SnapshotCommand>,
    /// The VM to snapshot.
    name: Option<String>,
    /// The directory to write (`state` and `memory` files).
    dir: Option<PathBuf>,
    /// Leave the VM paused after the snapshot.
    #[arg(long)]
    leave_paused: bool,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Describe a snapshot (its state file, or its directory).
    Inspect { path: PathBuf },
}

/// The files of a snapshot directory.
pub const SNAPSHOT_STATE: &str = "state";
pub const SNAPSHOT_MEMORY: &str = "memory";

#[derive(clap::Args)]
pub struct RunArgs {
    /// Machine file (JSON) with the same settings as the flags; flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kernel: ELF vmlinux (64-bit entry) or bzImage.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0 reboot=k panic=-1].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory, e.g. 256M or 1G [default: 256M].
    #[arg(long, value_parser = config::parse_size)]
    pub mem: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// CPU engine: kvm, emu, or auto (kvm when /dev/kvm can run ordinary
    /// guests, emu otherwise) [default: auto].
    #[arg(long)]
    pub accel: Option<String>,
    /// emu engine: run hot guest code through the JIT tier (`on`) or only
    /// the interpreter (`off`) [default: on].
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub jit: Option<bool>,
    /// A virtio-blk disk: path=IMAGE[,readonly=on]. Repeatable; the first
    /// is /dev/vda in the guest.
    #[arg(long = "disk", value_name = "path=IMG[,readonly=on]", value_parser = device_args::parse_disk)]
    pub disks: Vec<vmm::machine::DiskConfig>,
    /// A virtio-net device on a TAP interface: [tap=NAME][,mac=MAC].
    /// Repeatable. The tap is opened if it exists and created otherwise.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = device_args::parse_net)]
    pub nets: Vec<vmm::machine::NetConfig>,
    /// Offer a virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    pub rng: bool,
    /// Add a virtio-console (/dev/hvc0 in the guest) and append its output
    /// to this file.
    #[arg(long, value_name = "FILE")]
    pub console_output: Option<PathBuf>,
    /// A virtio-vsock device: cid=N,uds=PATH (Firecracker's hybrid vsock:
    /// host programs connect to PATH and write `CONNECT <port>\n`; guest
    /// connections to CID 2 port P reach a listener at PATH_P).
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = device_args::parse_vsock)]
    pub vsock: Option<vmm::machine::VsockConfig>,
    /// Serve Firecracker's API on this Unix socket. Without --kernel, the
    /// VM waits for its configuration and InstanceStart over the API.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Name the VM: it gets a runtime directory with its API socket,
    /// console socket and console log, and shows in `vessel ps`.
    #[arg(long)]
    pub name: Option<String>,
    /// Run in the background (needs --name); prints the name once the
    /// VM's API is ready.
    #[arg(long, short = 'd', requires = "name")]
    pub detach: bool,
    /// Start from a snapshot directory (`vessel snapshot`) instead of a
    /// kernel.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "config"])]
    pub restore: Option<PathBuf>,
    /// With --restore: the vsock device listens on this socket instead of
    /// the snapshot's (the API's `vsock_override`).
    #[arg(long, value_name = "PATH", requires = "restore")]
    pub vsock_uds: Option<PathBuf>,
    /// With --restore: leave the VM paused.
    #[arg(long, requires = "restore")]
    pub paused: bool,
    /// Wait for an incoming migration on unix:PATH or tcp:HOST:PORT
    /// instead of booting (the API's PUT /migration/receive).
    #[arg(long, value_name = "URL", conflicts_with_all = ["kernel", "config", "restore"])]
    pub incoming: Option<String>,
    /// Stand by for a primary (`vessel protect NAME --standby URL`) on
    /// unix:PATH or tcp:HOST:PORT: hold its checkpoints and take over when
    /// it goes silent (the API's PUT /failover/standby).
    #[arg(long, value_name = "URL", conflicts_with_all = ["kernel", "config", "restore", "incoming"])]
    pub standby: Option<String>,
    /// With --standby: take over only on PUT /failover/takeover.
    #[arg(long, requires = "standby")]
    pub manual_takeover: bool,
    /// Turn the seccomp filters off (for debugging). Without it every
    /// thread runs under its own allow-list; a call outside it ends the
    /// process with exit code 148 and names the call (docs/SECURITY.md).
    #[arg(long)]
    pub no_seccomp: bool,
}

/// The `vessel` binary's entry point (also `firecracker` and its flags
/// when started under that name).
pub fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let invoked_as = Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if invoked_as == "firecracker" {
        return crate::firecracker::main();
    }
    if invoked_as == "jailer" {
        return crate::jail::main();
    }
    let process_start = Instant::now();
    let cli = Cli::parse();
    crate::logging::init(cli.verbose);
    let result = match cli.command {
        Command::Run(args) => return run(*args, process_start),
        Command::Disk(args) => return disk_cmd::run(args),
        Command::Jail(args) => return crate::jail::main_with(args),
        Command::Exec(args) => return crate::exec::main(*args),
        Command::Ps => ps(),
        Command::Pause { name } => set_state(&name, "Paused"),
        Command::Resume { name } => set_state(&name, "Resumed"),
        Command::Stop { name, timeout } => stop(&name, Duration::from_secs(timeout)),
        Command::Kill { name } => kill(&name),
        Command::Inspect { name } => inspect(&name),
        Command::Logs { name, follow } => logs(&name, follow),
        Command::Console { name } => console(&name),
        Command::Snapshot(a) => snapshot(a),
        Command::Migrate(a) => api_of(&a.name).and_then(|sock| crate::migration::cli_migrate(&sock, &a)),
        Command::Protect(a) => api_of(&a.name).and_then(|sock| crate::failover::cli_protect(&sock, &a)),
        Command::Restore {
            dir,
            name,
            count,
            accel,
            paused,
            vsock_uds,
        } => restore(&dir, name, count, accel, paused, vsock_uds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs, process_start: Instant) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(2)
    };
    if args.detach {
        return match detach(args.name.as_deref().unwrap_or_default()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    let runtime_dir = match &args.name {
        Some(n) => match runtime::claim(n) {
            Ok(d) => Some(d),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let api_sock = match (&args.api_sock, &runtime_dir) {
        (Some(_), Some(_)) => {
            return fail("--name puts the API socket in the VM's runtime directory; leave out --api-sock".into())
        }
        (Some(p), None) => Some(p.clone()),
        (None, Some(d)) => Some(d.join(runtime::API_SOCK)),
        (None, None) => None,
    };
    let waits_for_api = api_sock.is_some() && args.kernel.is_none() && args.config.is_none() && args.restore.is_none();
    let detached_child = std::env::var_os("VESSEL_DETACHED").is_some();
    let console = if detached_child {
        ConsoleMode::Detached
    } else {
        ConsoleMode::Terminal
    };
    let id = args.name.clone().unwrap_or_else(|| "anonymous-instance".into());
    let mut launch = Launch {
        id,
        runtime_dir,
        api_sock,
        max_payload: crate::api::MAX_PAYLOAD,
        config: fc::FullVmConfig::default(),
        start_now: !waits_for_api,
        console,
        process_start,
        metrics_path: None,
        restore: None,
        incoming: args.incoming.clone().map(|url| crate::migration::ReceiveRequest {
            receiver_url: url,
            accel: args.accel.clone(),
            network_overrides: Vec::new(),
        }),
        standby: args.standby.clone().map(|url| crate::failover::StandbyRequest {
            listen_url: url,
            takeover: if args.manual_takeover {
                crate::failover::TakeoverMode::Manual
            } else {
                crate::failover::TakeoverMode::Auto
            },
            network_overrides: Vec::new(),
        }),
        seccomp: !args.no_seccomp,
    };
    if args.incoming.is_some() || args.standby.is_some() {
        launch.start_now = false;
        return crate::launch::run_with(launch, None);
    }
    if let Some(dir) = &args.restore {
        launch.start_now = false;
        launch.restore = Some(fc::SnapshotLoad {
            snapshot_path: dir.join(SNAPSHOT_STATE),
            mem_file_path: None,
            mem_backend: Some(fc::MemBackend {
                backend_type: "File".into(),
                backend_path: dir.join(SNAPSHOT_MEMORY),
            }),
            enable_diff_snapshots: false,
            track_dirty_pages: false,
            resume_vm: !args.paused,
            network_overrides: Vec::new(),
            vsock_override: args.vsock_uds.clone().map(|uds_path| fc::VsockOverride { uds_path }),
            accel: args.accel.clone(),
        });
        return crate::launch::run_with(launch, None);
    }
    if waits_for_api {
        return crate::launch::run_with(launch, None);
    }
    let settings = match config::resolve(args) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    launch.start_now = true;
    crate::launch::run_with(launch, Some((settings.machine, settings.accel)))
}

/// Start this same command again in the background, without --detach,
/// and wait until its API answers.
fn detach(name: &str) -> Result<(), String> {
    runtime::check_name(name)?;
    let dir = runtime::dir_of(name);
    if dir.exists() && runtime::is_live(&dir) {
        return Err(format!("a VM named {name:?} is already running"));
    }
    std::fs::create_dir_all(runtime::base()).map_err(|e| format!("{}: {e}", runtime::base().display()))?;
    let log_path = runtime::base().join(format!(".{name}.vmm.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--detach" && a != "-d")
        .collect();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vessel binary: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .env("VESSEL_DETACHED", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child only calls it before exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start the VM: {e}"))?;
    let sock = dir.join(runtime::API_SOCK);
    let deadline = Instant::now() + API_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_file(&log_path);
            let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            let last = last.strip_prefix("error: ").unwrap_or(last);
            return Err(format!("the VM exited at once ({status}): {last}"));
        }
        if client::request(&sock, "GET", "/", None, Duration::from_secs(1)).is_ok_and(|r| r.status == 200) {
            // The VMM's own messages stay with its runtime directory.
            let _ = std::fs::rename(&log_path, dir.join(runtime::VMM_LOG));
            println!("{name}");
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the VM's API did not come up within {} s",
                API_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The API socket of a running VM named `name`.
pub(crate) fn api_of(name: &str) -> Result<PathBuf, String> {
    runtime::check_name(name)?;
    let dir = runtime::dir_of(name);
    if !dir.exists() || !runtime::is_live(&dir) {
        return Err(format!("no VM named {name:?} is running (see vessel ps)"));
    }
    Ok(dir.join(runtime::API_SOCK))
}

fn call(name: &str, method: &str, path: &str, body: Option<&str>) -> Result<client::Reply, String> {
    let sock = api_of(name)?;
    let r = client::request(&sock, method, path, body, API_TIMEOUT).map_err(|e| format!("{name}: {e}"))?;
    if r.status >= 400 {
        return Err(format!("{name}: {}", r.fault()));
    }
    Ok(r)
}

fn ps() -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<20} {:<12} {:<6} {:>5} {:>8} {:>9} {:>8}  PROTECTION",
        "NAME", "STATE", "ENGINE", "VCPUS", "MEMORY", "UPTIME", "PID"
    );
    for (name, dir) in runtime::list() {
        let sock = dir.join(runtime::API_SOCK);
        let info = client::request(&sock, "GET", "/", None, Duration::from_secs(2))
            .map(|r| r.json())
            .unwrap_or(serde_json::Value::Null);
        let mc = client::request(&sock, "GET", "/machine-config", None, Duration::from_secs(2))
            .map(|r| r.json())
            .unwrap_or(serde_json::Value::Null);
        let state = info["state"].as_str().unwrap_or("starting");
        let engine = info["engine"].as_str().unwrap_or("-");
        let vcpus = mc["vcpu_count"].as_u64().map(|v| v.to_string()).unwrap_or("-".into());
        let mem = mc["mem_size_mib"]
            .as_u64()
            .map(|v| format!("{v}M"))
            .unwrap_or("-".into());
        let uptime = info["uptime_s"].as_u64().map(format_uptime).unwrap_or("-".into());
        let pid = runtime::read_pid(&dir).map(|p| p.to_string()).unwrap_or("-".into());
        let fo = client::request(&sock, "GET", "/failover", None, Duration::from_secs(2))
            .map(|r| r.json())
            .unwrap_or(serde_json::Value::Null);
        let protection = match (fo["role"].as_str(), fo["status"].as_str()) {
            (Some(role), Some(status)) => format!("{role} {status}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{name:<20} {state:<12} {engine:<6} {vcpus:>5} {mem:>8} {uptime:>9} {pid:>8}  {protection}"
        );
    }
    Ok(())
}

fn format_uptime(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
}

fn set_state(name: &str, state: &str) -> Result<(), String> {
    call(name, "PATCH", "/vm", Some(&format!(r#"{{"state": "{state}"}}"#)))?;
    Ok(())
}

fn pid_of(name: &str) -> Result<i32, String> {
    api_of(name)?;
    runtime::read_pid(&runtime::dir_of(name)).ok_or_else(|| format!("{name}: no pid file"))
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while runtime::pid_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn stop(name: &str, timeout: Duration) -> Result<(), String> {
    let pid = pid_of(name)?;
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if wait_gone(pid, timeout) {
        return Ok(());
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid, Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(runtime::dir_of(name));
    Err(format!("{name} did not stop within {} s; killed it", timeout.as_secs()))
}

fn kill(name: &str) -> Result<(), String> {
    let pid = pid_of(name)?;
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid, Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(runtime::dir_of(name));
    Ok(())
}

fn inspect(name: &str) -> Result<(), String> {
    let info = call(name, "GET", "/", None)?.json();
    let config = call(name, "GET", "/vm/config", None)?.json();
    let doc = serde_json::json!({
        "name": name,
        "runtime_dir": runtime::dir_of(name),
        "instance": info,
        "config": config,
    });
    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    Ok(())
}

fn logs(name: &str, follow: bool) -> Result<(), String> {
    runtime::check_name(name)?;
    let dir = runtime::dir_of(name);
    let path = dir.join(runtime::CONSOLE_LOG);
    let mut f = std::fs::File::open(&path).map_err(|_| format!("no console log for a VM named {name:?}"))?;
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n > 0 {
            out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            continue;
        }
        let _ = out.flush();
        if !follow || !runtime::is_live(&dir) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn console(name: &str) -> Result<(), String> {
    api_of(name)?;
    let sock = runtime::dir_of(name).join(runtime::CONSOLE_SOCK);
    let stream = std::os::unix::net::UnixStream::connect(&sock)
        .map_err(|e| format!("{name}: cannot attach to the console ({e}); has the VM started?"))?;
    eprintln!("attached to {name}'s console; Ctrl-A d detaches\r");
    crate::console::enter_raw();
    let mut from_vm = stream.try_clone().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
        // The VM went away: end the attach.
        crate::console::leave_raw();
        eprintln!("\r\nvessel: the console closed");
        std::process::exit(0);
    });
    let mut to_vm = stream;
    let mut esc = crate::console::Escape::detach_key();
    let mut buf = [0u8; 4096];
    let mut stdin = std::io::stdin();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut send = Vec::with_capacity(n);
        for &b in &buf[..n] {
            match esc.feed(b) {
                crate::console::Key::Send(c) => send.push(c),
                crate::console::Key::Quit => {
                    let _ = to_vm.write_all(&send);
                    crate::console::leave_raw();
                    eprintln!("\r\ndetached from {name}");
                    std::process::exit(0);
                }
                crate::console::Key::Nothing => {}
            }
        }
        if to_vm.write_all(&send).is_err() {
            break;
        }
    }
    // Standard input ended (not a terminal): let the output drain briefly.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

fn snapshot(a: SnapshotArgs) -> Result<(), String> {
    if let Some(SnapshotCommand::Inspect { path }) = a.inspect {
        let file = if path.is_dir() { path.join(SNAPSHOT_STATE) } else { path };
        let state = vmm::persist::MachineState::read_file(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        print!("{}", crate::snapshot_text::describe(&state));
        return Ok(());
    }
    let (Some(name), Some(dir)) = (a.name, a.dir) else {
        return Err("usage: vessel snapshot NAME DIR [--leave-paused], or vessel snapshot inspect FILE".into());
    };
    let state = call(&name, "GET", "/", None)?.json();
    let was_running = state["state"] == "Running";
    if was_running {
        set_state(&name, "Paused")?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
    let body = serde_json::json!({
        "snapshot_type": "Full",
        "snapshot_path": dir.join(SNAPSHOT_STATE),
        "mem_file_path": dir.join(SNAPSHOT_MEMORY),
    })
    .to_string();
    let started = Instant::now();
    let result = call(&name, "PUT", "/snapshot/create", Some(&body));
    let took = started.elapsed();
    if was_running && !a.leave_paused {
        set_state(&name, "Resumed")?;
    }
    result?;
    eprintln!(
        "snapshot of {name} in {} ({} ms); {}",
        dir.display(),
        took.as_millis(),
        if was_running && !a.leave_paused {
            "resumed"
        } else {
            "left paused"
        }
    );
    Ok(())
}

fn restore(
    dir: &Path,
    name: Option<String>,
    count: u32,
    accel: Option<String>,
    paused: bool,
    vsock_uds: Option<String>,
) -> Result<(), String> {
    if !dir.join(SNAPSHOT_STATE).exists() {
        return Err(format!(
            "{}: no snapshot here (no {SNAPSHOT_STATE} file)",
            dir.display()
        ));
    }
    if count == 0 {
        return Err("--count must be at least 1".into());
    }
    if let Some(p) = &vsock_uds {
        if count > 1 && !p.contains("{name}") {
            return Err(format!(
                "--vsock-uds {p}: with --count {count} each clone needs its own socket: put {{name}} in the path"
            ));
        }
    }
    let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
    let base = name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "clone".into())
    });
    let names: Vec<String> = if count == 1 && name.is_some() {
        vec![base]
    } else {
        // The first free numbers.
        let mut out = Vec::new();
        let mut i = 1;
        while out.len() < count as usize {
            let n = format!("{base}-{i}");
            if !runtime::dir_of(&n).exists() {
                out.push(n);
            }
            i += 1;
        }
        out
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vessel binary: {e}"))?;
    for n in &names {
        runtime::check_name(n)?;
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["run", "--detach", "--name", n]).arg("--restore").arg(&dir);
        if let Some(a) = &accel {
            cmd.args(["--accel", a]);
        }
        if paused {
            cmd.arg("--paused");
        }
        if let Some(p) = &vsock_uds {
            cmd.arg("--vsock-uds").arg(p.replace("{name}", n));
        }
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot start {n}: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!("{n}: {}", err.trim().trim_start_matches("error: ")));
        }
        println!("{n}");
    }
    Ok(())
}

/// `on` or `off`, for switches like `--jit`.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}' is neither on nor off")),
    }
}
