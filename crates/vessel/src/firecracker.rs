//! Started under the name `firecracker` (a symlink to vessel), the binary
//! takes Firecracker's command line, so tooling that runs `firecracker
//! --api-sock S [--config-file F]` runs Vessel unchanged. A flag Vessel
//! does not support is refused with one line naming it; none is silently
//! ignored.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use crate::fc;
use crate::launch::{ConsoleMode, Launch};

#[derive(Parser, Debug)]
#[command(
    name = "firecracker",
    disable_version_flag = true,
    about = "Vessel, started as firecracker"
)]
struct FirecrackerArgs {
    /// Path to the API socket.
    #[arg(long, default_value = "/run/firecracker.socket")]
    api_sock: PathBuf,
    /// A JSON file with the VM's whole configuration (Firecracker's
    /// format); the VM boots at once.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long, requires = "config_file")]
    no_api: bool,
    /// The VM's id.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// The VMM's log: a file or named pipe.
    #[arg(long)]
    log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long)]
    level: Option<String>,
    /// Only log this module.
    #[arg(long)]
    module: Option<String>,
    /// Show the level in log lines.
    #[arg(long)]
    show_level: bool,
    /// Show the file and line in log lines.
    #[arg(long)]
    show_log_origin: bool,
    /// Metrics: a file or named pipe getting one JSON line per flush.
    #[arg(long)]
    metrics_path: Option<PathBuf>,
    /// Largest API request body, in bytes.
    #[arg(long, default_value_t = crate::api::MAX_PAYLOAD)]
    http_api_max_payload_size: usize,
    /// Turn the seccomp filters off (for debugging).
    #[arg(long)]
    no_seccomp: bool,
    /// A custom seccomp filter (not supported: refused).
    #[arg(long)]
    seccomp_filter: Option<PathBuf>,
    /// Process start time as the jailer measured it (informational).
    #[arg(long)]
    start_time_us: Option<u64>,
    /// Process CPU start time as the jailer measured it (informational).
    #[arg(long)]
    start_time_cpu_us: Option<u64>,
    /// The jailer's CPU time (informational).
    #[arg(long)]
    parent_cpu_time_us: Option<u64>,
    /// Print the version and exit.
    #[arg(long)]
    version: bool,
    /// Boot-time measuring device (not supported: refused).
    #[arg(long)]
    boot_timer: bool,
    /// MMDS size limit (no MMDS in Vessel: refused).
    #[arg(long)]
    mmds_size_limit: Option<u64>,
    /// MMDS contents (no MMDS in Vessel: refused).
    #[arg(long)]
    metadata: Option<PathBuf>,
    /// Print a snapshot file's version (refused until snapshots land).
    #[arg(long)]
    describe_snapshot: Option<PathBuf>,
}

fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

pub fn main() -> ExitCode {
    let process_start = Instant::now();
    let args = match FirecrackerArgs::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::from(1);
        }
    };
    if args.version {
        println!(
            "Firecracker v{} (Vessel {})",
            crate::control::FIRECRACKER_API_VERSION,
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let refuse = |flag: &str, why: &str| {
        eprintln!("error: {flag} is not supported by Vessel: {why}");
        ExitCode::from(1)
    };
    if args.seccomp_filter.is_some() {
        return refuse("--seccomp-filter", "custom seccomp filters are not implemented");
    }
    if args.boot_timer {
        return refuse("--boot-timer", "there is no boot-timer device");
    }
    if args.mmds_size_limit.is_some() {
        return refuse("--mmds-size-limit", "there is no MMDS");
    }
    if args.metadata.is_some() {
        return refuse("--metadata", "there is no MMDS");
    }
    if args.describe_snapshot.is_some() {
        return refuse("--describe-snapshot", "snapshots are not implemented yet");
    }
    if let Err(e) = fc::check_id("--id", &args.id) {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    crate::logging::init(0);
    if args.log_path.is_some()
        || args.level.is_some()
        || args.module.is_some()
        || args.show_level
        || args.show_log_origin
    {
        let l = fc::Logger {
            log_path: args.log_path.clone(),
            level: args.level.clone(),
            show_level: Some(args.show_level),
            show_log_origin: Some(args.show_log_origin),
            module: args.module.clone(),
        };
        if let Err(e) = crate::logging::configure(&l) {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    }
    let config = match &args.config_file {
        Some(p) => match std::fs::read(p)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<fc::FullVmConfig>(&b).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: --config-file {}: {e}", p.display());
                return ExitCode::from(1);
            }
        },
        None => fc::FullVmConfig::default(),
    };
    crate::launch::run_with(
        Launch {
            id: args.id,
            runtime_dir: None,
            api_sock: (!args.no_api).then_some(args.api_sock),
            max_payload: args.http_api_max_payload_size,
            start_now: args.config_file.is_some(),
            config,
            console: ConsoleMode::Stdio,
            process_start,
            metrics_path: args.metrics_path,
            restore: None,
            incoming: None,
            standby: None,
            seccomp: !args.no_seccomp,
        },
        None,
    )
}
