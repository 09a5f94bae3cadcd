//! The VMM process: its main loop owns the one [`Controller`]; the API
//! thread, the signal thread and the VM's own run thread send it
//! [`Msg`]s. It ends when the VM's run ends (or on a stop before any VM
//! started), with the exit code the outcome calls for.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::Instant;

use crate::console_hub::ConsoleHub;
use crate::control::{ActionError, ConsoleWiring, Controller, Exit, Msg, VmmAction};
use crate::fc;
use crate::metrics::{MetricsSink, FLUSH_PERIOD};
use crate::{runtime, signals};

/// How the serial console is connected.
pub enum ConsoleMode {
    /// The VMM's stdout, and stdin as input when it is a terminal (raw
    /// mode, Ctrl-A x quits).
    Terminal,
    /// stdout only, with stdin as input whatever it is (Firecracker: the
    /// guest's console is the process's standard streams).
    Stdio,
    /// No terminal: a detached VM.
    Detached,
}

pub struct Launch {
    pub id: String,
    /// A named VM's runtime directory (console log and socket, pid).
    pub runtime_dir: Option<PathBuf>,
    pub api_sock: Option<PathBuf>,
    pub max_payload: usize,
    pub config: fc::FullVmConfig,
    /// Boot at once (a kernel was given), else wait for the API.
    pub start_now: bool,
    pub console: ConsoleMode,
    pub process_start: Instant,
    /// Metrics file from the command line (Firecracker's --metrics-path).
    pub metrics_path: Option<PathBuf>,
    /// Start from this snapshot.
    pub restore: Option<fc::SnapshotLoad>,
    /// Wait for an incoming migration (`vessel run --incoming`, with its
    /// `--accel`).
    pub incoming: Option<crate::migration::ReceiveRequest>,
    /// Stand by for a failover primary (`vessel run --standby`).
    pub standby: Option<crate::failover::StandbyRequest>,
    /// Filter every thread's syscalls (off with --no-seccomp).
    pub seccomp: bool,
}

fn restore_terminal() {
    crate::console::leave_raw();
}

fn wiring(l: &Launch, hub: ConsoleHub) -> ConsoleWiring {
    let console_sock = l.runtime_dir.as_ref().map(|d| d.join(runtime::CONSOLE_SOCK));
    let terminal = matches!(l.console, ConsoleMode::Terminal);
    let stdin_input = !matches!(l.console, ConsoleMode::Detached);
    let out_hub = hub.clone();
    ConsoleWiring {
        default_output: Box::new(move || out_hub.writer()),
        on_start: Box::new(move |input| {
            if let Some(sock) = &console_sock {
                if let Err(e) = hub.serve(sock, input.clone()) {
                    tracing::warn!("console socket {}: {e}", sock.display());
                }
            }
            if stdin_input {
                if terminal {
                    crate::console::enter_raw();
                }
                crate::console::spawn_input(input);
            }
        }),
    }
}

/// Run the VMM until its VM ends; the process's exit code. `direct` is a
/// whole machine from `vessel run`'s flags, with its `--accel`.
pub fn run_with(l: Launch, direct: Option<(vmm::MachineConfig, String)>) -> ExitCode {
    signals::block();
    // Before any thread starts, any file or socket is opened on a
    // client's behalf, or any guest code runs: the main thread's filter
    // (the other threads add their own at their start).
    if l.seccomp {
        if let Err(e) = vmm::seccomp::enable() {
            return fail(&e.to_string());
        }
        vmm::seccomp::enter(vmm::seccomp::ThreadKind::Vmm);
    }
    let (tx, rx) = channel::<Msg>();
    signals::spawn(tx.clone());
    let metrics = MetricsSink::default();
    let to_stdout = !matches!(l.console, ConsoleMode::Detached);
    let log = l.runtime_dir.as_ref().map(|d| d.join(runtime::CONSOLE_LOG));
    let hub = match ConsoleHub::new(to_stdout, log.as_deref()) {
        Ok(h) => h,
        Err(e) => return fail(&format!("console log: {e}")),
    };
    let mut ctl = Controller::new(l.id.clone(), wiring(&l, hub), tx.clone(), metrics.clone());
    if let Some((machine, accel)) = direct {
        ctl.configure_direct(machine, accel);
    }
    if let Some(p) = &l.metrics_path {
        if let Err(e) = ctl.handle(VmmAction::PutMetrics(fc::Metrics {
            metrics_path: p.clone(),
        })) {
            return fail(&e.to_string());
        }
    }
    if let Err(e) = ctl.apply_full_config(l.config) {
        return fail(&e.to_string());
    }
    if let Some(sock) = &l.api_sock {
        if let Err(e) = crate::api::serve(sock, tx.clone(), l.max_payload) {
            return fail(&format!("API socket {}: {e}", sock.display()));
        }
        metrics.set_startup(l.process_start);
        tracing::info!(
            "API ready on {} after {} us",
            sock.display(),
            l.process_start.elapsed().as_micros()
        );
    }
    if let Some(dir) = &l.runtime_dir {
        if let Err(e) = runtime::write_pid(dir) {
            return fail(&e);
        }
    }
    if let Some(load) = l.restore {
        if let Err(e) = ctl.handle(VmmAction::LoadSnapshot(load)) {
            return fail(&e.to_string());
        }
    }
    if let Some(r) = l.incoming {
        if let Err(e) = ctl.handle(VmmAction::MigrationReceive(r)) {
            return fail(&e.to_string());
        }
    }
    if let Some(r) = l.standby {
        if let Err(e) = ctl.handle(VmmAction::FailoverStandby(r)) {
            return fail(&e.to_string());
        }
    }
    if l.start_now {
        if let Err(e) = ctl.handle(VmmAction::InstanceStart) {
            let msg = match e {
                ActionError::StartMicrovm(m) => m,
                e => e.to_string(),
            };
            return fail(&msg);
        }
    }
    let code = main_loop(&mut ctl, &rx);
    let _ = ctl.metrics().flush();
    restore_terminal();
    if let Some(dir) = &l.runtime_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    code
}

fn fail(msg: &str) -> ExitCode {
    restore_terminal();
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

fn main_loop(ctl: &mut Controller, rx: &std::sync::mpsc::Receiver<Msg>) -> ExitCode {
    let mut last_flush = Instant::now();
    loop {
        let msg = match rx.recv_timeout(FLUSH_PERIOD.saturating_sub(last_flush.elapsed())) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                let _ = ctl.metrics().flush();
                last_flush = Instant::now();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return ExitCode::SUCCESS,
        };
        match msg {
            Msg::Request { action, reply } => {
                let result = ctl.handle(action);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Msg::Signal(sig) => on_signal(ctl, sig),
            Msg::Call(f) => f(ctl),
            Msg::Exit(Exit::NeverStarted) => return ExitCode::SUCCESS,
            Msg::Exit(Exit::Ran(outcome)) => {
                ctl.mark_shut_down();
                restore_terminal();
                return exit_code(outcome);
            }
        }
    }
}

fn on_signal(ctl: &mut Controller, sig: i32) {
    match sig {
        libc::SIGUSR1 => match ctl.handle(VmmAction::Pause) {
            Ok(_) => eprintln!(
                "vessel: paused (every vCPU out of the guest, devices stopped; {})",
                ctl.vcpu_summary()
            ),
            Err(e) => eprintln!("vessel: cannot pause: {e}"),
        },
        libc::SIGUSR2 => match ctl.handle(VmmAction::Resume) {
            Ok(_) => eprintln!("vessel: resumed"),
            Err(e) => eprintln!("vessel: cannot resume: {e}"),
        },
        _ => {
            let _ = ctl.handle(VmmAction::Stop);
        }
    }
}

/// The exit code for how the run ended (see the README).
pub fn exit_code(outcome: vmm::RunOutcome) -> ExitCode {
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
