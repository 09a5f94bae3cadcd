//! The CPU benchmark programs (guest/cpubench/cpubench.c, built by
//! guest/build-cpubench.sh) compute the same checksums in a guest under
//! the emu engine as natively on the host: glibc's string functions, an
//! integer sieve and CRC, double-precision sqrt and division, and 128-bit
//! multiplies and divides give bit-identical results. Times are printed by
//! the program but never checked here (bench cpu_programs compares them).

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{artifact, assert_clean_run, b64, stdout, vessel, TimedOutput};

/// `name -> checksum` from cpubench's `CPUBENCH name=N checksum=C ...` lines.
fn checksums(out: &str) -> BTreeMap<String, String> {
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(String::from))
    };
    out.lines()
        .filter_map(|l| l.find("CPUBENCH name=").map(|i| &l[i..]))
        .filter_map(|l| Some((field(l, "name")?, field(l, "checksum")?)))
        .collect()
}

fn same_checksums_as_native(programs: &[&str]) {
    let native = Command::new(artifact("cpubench/cpubench"))
        .arg("1")
        .args(programs)
        .output()
        .expect("run cpubench natively");
    assert!(native.status.success(), "native cpubench failed: {native:?}");
    let want = checksums(&String::from_utf8_lossy(&native.stdout));
    assert_eq!(want.len(), programs.len(), "native run: {want:?}");
    let cmd = format!("/bin/cpubench 1 {}", programs.join(" "));
    let o = vessel()
        .args(["run", "--accel", "emu", "--mem", "256M", "--kernel"])
        .arg(artifact("kernel/vmlinux"))
        .arg("--initrd")
        .arg(artifact("cpubench/initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 vessel.end=reboot vessel.cmd={}",
            b64(&cmd)
        ))
        .stdin(std::process::Stdio::null())
        .timed_output()
        .expect("run vessel");
    assert_clean_run(&o);
    let got = checksums(&stdout(&o));
    assert_eq!(got, want, "guest (emu) checksums differ from the native run");
}

/// The quick pair: glibc string functions (SSE2/SSSE3 variants picked from
/// emu's CPUID) and integer loops with division.
#[test]
fn string_and_integer_programs_match_native() {
    same_checksums_as_native(&["strings", "intloop"]);
}

/// All seven programs under emu as it runs by default (with the JIT):
/// about 15 s of guest time (a minute under the interpreter alone).
#[test]
#[ignore = "long: every cpubench program under emu, 15-90 s"]
fn every_cpubench_program_matches_native() {
    same_checksums_as_native(&["memops", "strings", "sieve", "intloop", "fp", "mul128", "cpu_loop"]);
}
