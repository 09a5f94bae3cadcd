//! `vessel`: run a virtual machine.

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
    /// Boot a guest with its serial console on the terminal.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel: ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1 pci=off")]
    cmdline: String,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// CPU engine.
    #[arg(long, default_value = "emu")]
    accel: String,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1 << 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 256M or 1G"))?;
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    if args.accel != "emu" {
        eprintln!("error: --accel {} is not available yet; use --accel emu", args.accel);
        return ExitCode::from(2);
    }
    let cfg = vmm::MachineConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_size: args.mem,
        cpus: args.cpus,
    };
    let machine = match vmm::Machine::new(&cfg, Box::new(std::io::stdout())) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match machine.run() {
        vmm::RunOutcome::Reset => ExitCode::SUCCESS,
        vmm::RunOutcome::PowerOff => ExitCode::SUCCESS,
        vmm::RunOutcome::TripleFault(regs) => {
            eprintln!("error: guest triple fault: {regs}");
            ExitCode::from(4)
        }
    }
}
