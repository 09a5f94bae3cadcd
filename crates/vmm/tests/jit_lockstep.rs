//! The JIT against the interpreter on a real guest: the minimal guest
//! boots to its command with `VESSEL_JIT_LOCKSTEP` set, so every run of
//! translated code is first run by a shadow interpreter and compared
//! (x86emu's `jit::lockstep`). Engine: emu, JIT on. The first divergence
//! (RIP, the block's instructions, the registers that differ) fails the
//! test. One test in this file: the environment variable is per process.

mod common;

use std::time::Duration;

use common::{guest_config, tail, Guest};
use vmm::machine::RunOutcome;

#[test]
fn jit_matches_the_interpreter_in_lockstep_on_the_minimal_boot() {
    let report = std::env::temp_dir().join(format!("vessel-jit-lockstep-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&report);
    std::env::set_var(x86emu::JIT_LOCKSTEP_ENV, &report);
    let mut cfg = guest_config("echo LOCKSTEP-GUEST-RAN", "reboot");
    cfg.jit = true;
    let guest = Guest::boot(cfg, None);
    guest.wait_for("LOCKSTEP-GUEST-RAN");
    let log = guest.console.clone();
    let outcome = guest.finish(Duration::from_secs(120));
    let out = log.text();
    assert_eq!(outcome, RunOutcome::Reset, "{}", tail(&out));
    let text =
        std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("no lockstep report at {}: {e}", report.display()));
    let _ = std::fs::remove_file(&report);
    assert!(text.contains("no divergence"), "{text}");
    let compared: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("compared "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in the report:\n{text}"));
    eprintln!("{text}");
    assert!(compared > 10_000, "too few translated block runs compared:\n{text}");
}
