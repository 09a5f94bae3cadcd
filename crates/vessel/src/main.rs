//! `vessel`: run a virtual machine.
//!
//! SIGUSR1 pauses the VM and SIGUSR2 resumes it.
//!
//! Exit codes: 0 when the guest powers off or resets (Linux `reboot=k`) or
//! the user quits with Ctrl-A x; 2 for a configuration or image error; 4 for
//! a guest triple fault or a fault the engine reports (the vCPU's registers
//! are printed).

mod config;
mod console;
mod control;
mod device_args;
mod disk_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Boot a guest with its serial console on the terminal (Ctrl-A x quits).
    Run(RunArgs),
    /// Create, inspect, snapshot and convert disk images.
    Disk(disk_cmd::DiskArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Machine file (JSON) with the same settings as the flags; flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: ELF vmlinux (64-bit entry) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0 reboot=k panic=-1].
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory, e.g. 256M or 1G [default: 256M].
    #[arg(long, value_parser = config::parse_size)]
    mem: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    cpus: Option<u32>,
    /// CPU engine: kvm, emu, or auto (kvm when /dev/kvm can run ordinary
    /// guests, emu otherwise) [default: emu].
    #[arg(long)]
    accel: Option<String>,
    /// A virtio-blk disk: path=IMAGE[,readonly=on]. Repeatable; the first
    /// is /dev/vda in the guest.
    #[arg(long = "disk", value_name = "path=IMG[,readonly=on]", value_parser = device_args::parse_disk)]
    disks: Vec<vmm::machine::DiskConfig>,
    /// A virtio-net device on a TAP interface: [tap=NAME][,mac=MAC].
    /// Repeatable. The tap is opened if it exists and created otherwise.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = device_args::parse_net)]
    nets: Vec<vmm::machine::NetConfig>,
    /// Offer a virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Add a virtio-console (/dev/hvc0 in the guest) and append its output
    /// to this file.
    #[arg(long, value_name = "FILE")]
    console_output: Option<PathBuf>,
}

static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn cli_verbose() -> bool {
    VERBOSE.load(std::sync::atomic::Ordering::Relaxed)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    VERBOSE.store(cli.verbose > 0, std::sync::atomic::Ordering::Relaxed);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Disk(args) => disk_cmd::run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let settings = match config::resolve(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let engine = match settings.accel.parse::<vmm::Accel>().and_then(vmm::engine::choose) {
        Ok((engine, why)) => {
            if settings.accel == "auto" || cli_verbose() {
                eprintln!("{why}");
            }
            engine
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    control::block_signals();
    let machine = match vmm::Machine::with_engine(&settings.machine, Box::new(std::io::stdout()), engine) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let raw = console::RawMode::enable();
    console::spawn_input(machine.input_handle());
    control::spawn(machine.vm_handle());
    let outcome = machine.run();
    drop(raw);
    match outcome {
        vmm::RunOutcome::Reset | vmm::RunOutcome::PowerOff => ExitCode::SUCCESS,
        vmm::RunOutcome::TripleFault(regs) => {
            eprintln!("error: guest triple fault: {regs}");
            ExitCode::from(4)
        }
        vmm::RunOutcome::Fault(what) => {
            eprintln!("error: guest stopped: {what}");
            ExitCode::from(4)
        }
    }
}
