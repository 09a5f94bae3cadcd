//! Snapshots across engines with a small payload: a whole machine (the
//! payload is its "kernel", an ELF loaded as Linux's would be) runs a
//! checksummed loop and is snapshotted mid-loop under one engine and
//! restored under the other, several times over; it then prints its
//! iteration count and checksum, which must agree.
//!
//! They need /dev/kvm and fail, saying so, where it cannot be opened. The
//! host's PVM-type KVM runs these payloads (it cannot run Linux), so this
//! exercises every KVM state read and load of a snapshot (LAPIC, in-kernel
//! PIC/IOAPIC/PIT, clock, XSAVE, MSRs) on the host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use vmm::cpu_features::CpuFeatures;
use vmm::engine::EngineKind;
use vmm::machine::{Machine, MachineConfig, RunOutcome};
use vmm::persist::MachineState;
use x86emu::state::reg;

mod common;
use common::payload::*;

/// The payload: r8 = r8 * MUL + ADD and rbx += 1 until a byte arrives on
/// the serial port; then r8 and rbx go out on it (8 bytes each, little
/// endian) and the i8042 resets the machine.
fn payload() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lp = a.create_label();
    let mut out1 = a.create_label();
    let mut out2 = a.create_label();
    a.mov(r8, SEED).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.mov(rcx, MUL).unwrap();
    a.mov(rdi, ADD).unwrap();
    a.mov(edx, 0x3fdu32).unwrap();
    a.set_label(&mut lp).unwrap();
    a.imul_2(r8, rcx).unwrap();
    a.add(r8, rdi).unwrap();
    a.inc(rbx).unwrap();
    a.in_(al, dx).unwrap();
    a.test(al, 1).unwrap();
    a.jz(lp).unwrap();
    a.mov(edx, 0x3f8u32).unwrap();
    a.mov(rax, r8).unwrap();
    a.mov(ecx, 8u32).unwrap();
    a.set_label(&mut out1).unwrap();
    a.out(dx, al).unwrap();
    a.shr(rax, 8).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(out1).unwrap();
    a.mov(rax, rbx).unwrap();
    a.mov(ecx, 8u32).unwrap();
    a.set_label(&mut out2).unwrap();
    a.out(dx, al).unwrap();
    a.shr(rax, 8).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(out2).unwrap();
    a.mov(al, 0xfeu32).unwrap();
    a.out(0x64u32, al).unwrap();
    let mut hang = a.create_label();
    a.set_label(&mut hang).unwrap();
    a.hlt().unwrap();
    a.jmp(hang).unwrap();
    a.assemble(LOAD).unwrap()
}

fn config(dir: &Path) -> MachineConfig {
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(&payload())).unwrap();
    MachineConfig::new(kernel, 32 << 20)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vessel-kvmsnap-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Let it run a while, pause, snapshot to `dir/NAME.{state,mem}`, quit.
fn snapshot_after(r: Running, run_for: Duration, dir: &Path, name: &str) -> (MachineState, PathBuf) {
    std::thread::sleep(run_for);
    assert!(r.vm.pause(Duration::from_secs(10)), "{name}: the VM did not pause");
    let (state_file, mem_file) = (dir.join(format!("{name}.state")), dir.join(format!("{name}.mem")));
    r.vm.snapshot(&state_file, &mem_file)
        .unwrap_or_else(|e| panic!("{name}: snapshot: {e}"));
    r.vm.quit();
    r.thread.join().unwrap();
    let state = MachineState::read_file(&state_file).unwrap();
    (state, mem_file)
}

/// Restore, let it run a while, then end the loop and check the checksum.
fn restore(state: &MachineState, mem: &Path, engine: EngineKind) -> Running {
    let out = Output::default();
    let m = Machine::restore(state, mem, Box::new(out.clone()), engine)
        .unwrap_or_else(|e| panic!("restore under {engine}: {e}"));
    assert_eq!(m.engine(), engine);
    let r = start(m, out);
    r.vm.resume();
    r
}

fn finish(r: Running, at_least: u64) {
    // Some iterations under this engine first.
    std::thread::sleep(Duration::from_millis(300));
    r.input.send(b"x");
    let deadline = Instant::now() + Duration::from_secs(60);
    while r.out.0.lock().unwrap().len() < 16 {
        assert!(Instant::now() < deadline, "the payload did not answer");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(r.thread.join().unwrap(), RunOutcome::Reset);
    let out = r.out.0.lock().unwrap().clone();
    let sum = u64::from_le_bytes(out[..8].try_into().unwrap());
    let n = u64::from_le_bytes(out[8..16].try_into().unwrap());
    assert!(
        n > at_least,
        "{n} iterations, but {at_least} were done at the last snapshot"
    );
    assert_eq!(sum, checksum(n), "the checksum after {n} iterations is wrong");
}

fn iterations(s: &MachineState) -> u64 {
    s.cpus[0].gpr[reg::RBX]
}

/// emu -> kvm -> emu, and kvm -> kvm, each snapshot taken mid-loop.
#[test]
fn payload_moves_between_engines_mid_loop() {
    require_kvm();
    let dir = scratch("cross");
    let cfg = config(&dir);
    let out = Output::default();
    let m = Machine::with_engine(&cfg, Box::new(out.clone()), EngineKind::Emu).unwrap();
    let (s1, mem1) = snapshot_after(start(m, out), Duration::from_millis(300), &dir, "emu");
    assert_eq!(s1.engine, EngineKind::Emu);
    let n1 = iterations(&s1);
    assert!(n1 > 0, "the emu snapshot was taken before the loop ran");

    // The CPUID rule: restore under kvm refuses when KVM lacks a feature
    // the guest saw. PVM's KVM offers a CPUID for PVM guests, without
    // SSE3, SSSE3 or 1 GiB pages, which emu offers; the payload uses none
    // of them (nor CPUID), so past the refusal the test goes on as with a
    // guest that saw only what both engines offer.
    let kvm_offers = kvm_features();
    let lacking = s1.cpu_features.missing_from(&kvm_offers);
    let mut s1 = s1;
    if !lacking.is_empty() {
        let e = Machine::restore(&s1, &mem1, Box::new(Output::default()), EngineKind::Kvm)
            .err()
            .unwrap_or_else(|| panic!("restored under kvm though it lacks {lacking:?}"))
            .to_string();
        assert!(
            e.contains("kvm here does not offer") && e.contains(&lacking.join(", ")),
            "{e}"
        );
        s1.cpu_features = s1.cpu_features.intersection(&kvm_offers);
    }

    let r = restore(&s1, &mem1, EngineKind::Kvm);
    let (s2, mem2) = snapshot_after(r, Duration::from_millis(300), &dir, "kvm");
    assert_eq!(s2.engine, EngineKind::Kvm);
    assert!(s2.kvm.is_some(), "a snapshot under kvm carries KVM's own state");
    assert_eq!(s2.cpu_features, s1.cpu_features, "the guest saw the same CPU features");
    let n2 = iterations(&s2);
    assert!(n2 > n1, "no iterations under kvm ({n1} before, {n2} after)");

    // kvm -> emu, then the same snapshot kvm -> kvm (XSAVE and clock loaded).
    finish(restore(&s2, &mem2, EngineKind::Emu), n2);
    finish(restore(&s2, &mem2, EngineKind::Kvm), n2);
    std::fs::remove_dir_all(&dir).ok();
}

/// A machine booted under kvm offers what the host's KVM offers: its
/// snapshot restores under emu only when emu offers it all, and is
/// otherwise refused with the missing features named.
#[test]
fn kvm_booted_payload_restores_under_emu_only_with_its_cpu_features() {
    require_kvm();
    let dir = scratch("features");
    let cfg = config(&dir);
    let out = Output::default();
    let m = Machine::with_engine(&cfg, Box::new(out.clone()), EngineKind::Kvm).unwrap();
    let (s, mem) = snapshot_after(start(m, out), Duration::from_millis(300), &dir, "kvm");
    let n = iterations(&s);
    assert!(n > 0, "the kvm snapshot was taken before the loop ran");
    let missing = s.cpu_features.missing_from(&CpuFeatures::emu(1));
    match Machine::restore(&s, &mem, Box::new(Output::default()), EngineKind::Emu) {
        Ok(_) => assert!(missing.is_empty(), "restored under emu though it lacks {missing:?}"),
        Err(e) => {
            let e = e.to_string();
            assert!(!missing.is_empty(), "refused: {e}");
            assert!(e.contains("emu does not offer") && e.contains(&missing[0]), "{e}");
        }
    }
    finish(restore(&s, &mem, EngineKind::Kvm), n);
    std::fs::remove_dir_all(&dir).ok();
}
