//! `vessel`: run and drive virtual machines (and `firecracker`, when
//! started under that name). See `vessel --help` and the README.
//!
//! Exit codes of `vessel run`: 0 when the guest powers off or resets
//! (Linux `reboot=k`), the user quits with Ctrl-A x, or a SIGTERM/SIGINT
//! stops it; 2 for a configuration or image error; 4 for a guest triple
//! fault or a fault the engine reports (the vCPU's registers are printed).

fn main() -> std::process::ExitCode {
    vessel::cli::main()
}
