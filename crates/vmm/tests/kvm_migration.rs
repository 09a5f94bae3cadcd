//! Migration of kvm machines, live and cold, and across engines, with a
//! small payload as the guest: two machines in this process, the source's
//! `vmm::migration::send::send` on one end of a Unix socket pair and the
//! destination (`stream::receive`, `Machine::restore_with_memory`, then
//! prepared / commit / running, as `vessel`'s receiver does) on the other.
//!
//! The payload keeps rewriting a memory pattern: each pass over 8 MiB
//! checks that every page still holds the pass count it wrote last time,
//! then writes the next; it also advances a checksum per page. A page the
//! migration lost (a write KVM's dirty log did not report) holds an old
//! count on the destination and the next pass counts it as an error.
//!
//! They need /dev/kvm and fail, saying so, where it cannot be opened. The
//! host's PVM-type KVM runs these payloads (it cannot run Linux); Linux
//! guests migrate across engines in the nested-SVM test
//! (crates/vessel/tests/nested_kvm.rs).

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::cpu_features::CpuFeatures;
use vmm::engine::EngineKind;
use vmm::machine::{Machine, MachineConfig, RunOutcome, VmHandle};
use vmm::migration::send::{self, Mode, SendOptions, TimeoutAction};
use vmm::migration::stream::{self, Message};
use vmm::migration::{MigrationInfo, Status};
use x86emu::state::reg;

mod common;
use common::payload::*;
use common::Scratch;

/// The pattern: 2048 pages from 8 MiB.
const BUF: u64 = 0x80_0000;
const PAGES: u64 = 2048;
/// Where the payload writes its pass count after each pass.
const COUNTER: u64 = 0x7f_f000;

/// The payload. rbx counts passes; in pass rbx+1 each page's first qword
/// must be rbx (else r9 += 1 and r10 keeps the first bad page) and
/// becomes rbx+1, and r8 = r8 * MUL + ADD. After each pass the count goes
/// to COUNTER and the serial port is asked for a byte; once one came,
/// r8, rbx, r9 and r10 go out on it (8 bytes each, little endian) and the
/// i8042 resets the machine.
fn payload() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut pass = a.create_label();
    let mut page = a.create_label();
    let mut good = a.create_label();
    a.mov(r8, SEED).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.xor(r9d, r9d).unwrap();
    a.xor(r10d, r10d).unwrap();
    a.mov(rcx, MUL).unwrap();
    a.mov(rdi, ADD).unwrap();
    a.set_label(&mut pass).unwrap();
    a.mov(rsi, BUF).unwrap();
    a.mov(r11, BUF + PAGES * 4096).unwrap();
    a.lea(r12, qword_ptr(rbx + 1)).unwrap();
    a.set_label(&mut page).unwrap();
    a.cmp(qword_ptr(rsi), rbx).unwrap();
    a.je(good).unwrap();
    a.inc(r9).unwrap();
    a.test(r10, r10).unwrap();
    a.jnz(good).unwrap();
    a.mov(r10, rsi).unwrap();
    a.set_label(&mut good).unwrap();
    a.mov(qword_ptr(rsi), r12).unwrap();
    a.imul_2(r8, rcx).unwrap();
    a.add(r8, rdi).unwrap();
    a.add(rsi, 4096).unwrap();
    a.cmp(rsi, r11).unwrap();
    a.jb(page).unwrap();
    a.mov(rbx, r12).unwrap();
    a.mov(rax, COUNTER).unwrap();
    a.mov(qword_ptr(rax), rbx).unwrap();
    a.mov(edx, 0x3fdu32).unwrap();
    a.in_(al, dx).unwrap();
    a.test(al, 1).unwrap();
    a.jz(pass).unwrap();
    a.mov(edx, 0x3f8u32).unwrap();
    for r in [r8, rbx, r9, r10] {
        let mut byte = a.create_label();
        a.mov(rax, r).unwrap();
        a.mov(ecx, 8u32).unwrap();
        a.set_label(&mut byte).unwrap();
        a.out(dx, al).unwrap();
        a.shr(rax, 8).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(byte).unwrap();
    }
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

fn boot(dir: &Path, engine: EngineKind) -> Running {
    let out = Output::default();
    let m = Machine::with_engine(&config(dir), Box::new(out.clone()), engine)
        .unwrap_or_else(|e| panic!("booting the payload under {engine}: {e}"));
    assert_eq!(m.engine(), engine);
    start(m, out)
}

/// The pass count the guest last wrote.
fn passes(vm: &VmHandle) -> u64 {
    vm.guest_memory().read_obj::<u64>(GuestAddress(COUNTER)).unwrap()
}

fn wait_for_passes(vm: &VmHandle, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while passes(vm) < n {
        assert!(
            Instant::now() < deadline,
            "the payload made fewer than {n} passes in 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the destination saw.
struct Received {
    running: Running,
    /// The pass count in the state at the switch.
    passes_at_switch: u64,
    source_engine: EngineKind,
}

/// The destination's side, as `vessel`'s receiver does it, building the
/// machine under `engine`. Where `engine` lacks CPU features the guest
/// saw (PVM's KVM offers no SSE3, SSSE3 or 1 GiB pages, which emu does),
/// the refusal is checked and the guest is then taken as one that saw
/// only what both offer (the payload uses none of them, nor CPUID).
fn receive(conn: UnixStream, engine: EngineKind) -> Received {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    let incoming = stream::receive(
        &mut reader,
        1 << 40,
        &mut |size| vmm::memory::create(size).map_err(|e| e.to_string()),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("receiving: {e}"));
    let mut state = incoming.state;
    let passes_at_switch = incoming
        .mem
        .read_obj::<u64>(GuestAddress(COUNTER))
        .unwrap()
        .max(state.cpus[0].gpr[reg::RBX]);
    let source_engine = state.engine;
    let out = Output::default();
    let machine = match Machine::restore_with_memory(&state, incoming.mem.clone(), Box::new(out.clone()), engine) {
        Ok(m) => m,
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("does not offer"),
                "restoring the migrated state under {engine}: {e}"
            );
            let offered = match engine {
                EngineKind::Emu => CpuFeatures::emu(state.config.cpus),
                EngineKind::Kvm => kvm_features(),
            };
            let missing = state.cpu_features.missing_from(&offered);
            assert!(!missing.is_empty() && e.contains(&missing[0]), "{e}");
            state.cpu_features = state.cpu_features.intersection(&offered);
            Machine::restore_with_memory(&state, incoming.mem, Box::new(out.clone()), engine)
                .unwrap_or_else(|e| panic!("restoring under {engine} with the common CPU features: {e}"))
        }
    };
    assert_eq!(machine.engine(), engine);
    stream::write_message(&mut conn, &Message::Prepared).unwrap();
    conn.flush().unwrap();
    let paused_at = match stream::read_message(&mut reader).unwrap() {
        Message::Commit { paused_at_unix_ns, .. } => paused_at_unix_ns,
        m => panic!("{} instead of commit", m.name()),
    };
    let running = start(machine, out);
    running.vm.resume();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let downtime_ms = now.saturating_sub(paused_at) / 1_000_000;
    stream::write_message(&mut conn, &Message::Running { downtime_ms }).unwrap();
    conn.flush().unwrap();
    Received {
        running,
        passes_at_switch,
        source_engine,
    }
}

fn options(mode: Mode) -> SendOptions {
    SendOptions {
        mode,
        downtime_limit: Duration::from_millis(300),
        max_bandwidth: None,
        auto_converge: true,
        timeout: Duration::from_secs(120),
        timeout_action: TimeoutAction::Cancel,
        resume_on_failure: true,
    }
}

/// Migrate `src` to a new machine under `engine`; the source ends.
fn migrate(src: Running, engine: EngineKind, mode: Mode) -> (Running, MigrationInfo) {
    let before = passes(&src.vm);
    let (a, b) = UnixStream::pair().unwrap();
    let dst = std::thread::spawn(move || receive(b, engine));
    let info = Mutex::new(MigrationInfo::default());
    let mut reader = a.try_clone().unwrap();
    let outcome = send::send(&src.vm, &mut reader, a, &options(mode), &info, &AtomicBool::new(false))
        .unwrap_or_else(|e| panic!("migrating to {engine} ({mode:?}): {e}"));
    let info = info.into_inner().unwrap();
    assert_eq!(info.status, Status::Completed);
    // The source never runs again; it ends as `vessel` ends it.
    src.vm.quit();
    assert_eq!(src.thread.join().unwrap(), RunOutcome::Reset);
    let got = dst.join().unwrap();
    eprintln!(
        "{} -> {engine} ({mode:?}): {} rounds, {:.1} MiB sent, downtime {:?} ms, dirty rate {:.1} MB/s, \
         {} passes at the start, {} at the switch",
        got.source_engine,
        outcome.iterations,
        outcome.transferred_bytes as f64 / f64::from(1 << 20),
        outcome.downtime_ms,
        info.dirty_rate_bytes_per_s as f64 / 1e6,
        before,
        got.passes_at_switch
    );
    assert!(outcome.downtime_ms.is_some(), "no downtime report from the destination");
    if mode == Mode::Live {
        assert!(outcome.iterations >= 2, "a live migration in one round: {outcome:?}");
        // The guest ran during pre-copy, and its writes were found (under
        // kvm only KVM's dirty log sees them).
        assert!(
            got.passes_at_switch > before,
            "the guest made no progress during pre-copy ({before} passes before, {} at the switch)",
            got.passes_at_switch
        );
        assert!(
            info.dirty_rate_bytes_per_s > 0,
            "no dirty pages found while the guest wrote: {info:?}"
        );
    }
    (got.running, info)
}

/// End the loop and check the payload's report: the pattern intact, the
/// checksum right, more passes than `at_least`.
fn finish(r: Running, at_least: u64) {
    // Some passes here first.
    wait_for_passes(&r.vm, at_least + 2);
    r.input.send(b"x");
    let deadline = Instant::now() + Duration::from_secs(60);
    while r.out.0.lock().unwrap().len() < 32 {
        assert!(Instant::now() < deadline, "the payload did not answer");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(r.thread.join().unwrap(), RunOutcome::Reset);
    let out = r.out.0.lock().unwrap().clone();
    let word = |i: usize| u64::from_le_bytes(out[i * 8..i * 8 + 8].try_into().unwrap());
    let (sum, n, bad, first_bad) = (word(0), word(1), word(2), word(3));
    eprintln!("payload: {n} passes, {bad} stale pages");
    assert_eq!(
        bad, 0,
        "{bad} pages lost their last write in the migration (the first at {first_bad:#x})"
    );
    assert!(n > at_least, "{n} passes, but {at_least} were done at the last switch");
    assert_eq!(sum, checksum(n * PAGES), "the checksum after {n} passes is wrong");
}

/// KVM's dirty log, through the machine's one dirty bitmap: the pages the
/// vCPU writes, and only while tracking is on.
#[test]
fn kvm_dirty_log_reports_the_pages_the_guest_writes() {
    require_kvm();
    let s = Scratch::new("log");
    let r = boot(&s.0, EngineKind::Kvm);
    wait_for_passes(&r.vm, 2);
    let log = r.vm.dirty_log();
    log.enable(32 << 20).unwrap();
    let from = passes(&r.vm);
    wait_for_passes(&r.vm, from + 2);
    let pages = log.harvest().unwrap();
    for gpa in [COUNTER, BUF, BUF + (PAGES - 1) * 4096] {
        assert!(
            pages.contains(&gpa),
            "{gpa:#x} written but not reported ({} pages reported)",
            pages.len()
        );
    }
    assert!(
        !pages.contains(&(BUF + PAGES * 4096)),
        "a page the guest never writes was reported"
    );
    let from = passes(&r.vm);
    wait_for_passes(&r.vm, from + 2);
    let again = log.harvest().unwrap();
    assert!(
        again.contains(&BUF),
        "a page written after the harvest was not reported again"
    );
    log.disable();
    // With tracking off nothing is reported.
    let from = passes(&r.vm);
    wait_for_passes(&r.vm, from + 2);
    assert!(log.harvest().unwrap().is_empty());
    finish(r, from);
}

/// kvm to kvm: live, then the result cold; the pattern and the checksum
/// are right afterwards.
#[test]
fn kvm_payload_migrates_live_then_cold() {
    require_kvm();
    let s = Scratch::new("kvm");
    let r = boot(&s.0, EngineKind::Kvm);
    wait_for_passes(&r.vm, 100);
    let (r, _) = migrate(r, EngineKind::Kvm, Mode::Live);
    wait_for_passes(&r.vm, passes(&r.vm) + 100);
    let (r, _) = migrate(r, EngineKind::Kvm, Mode::Cold);
    let at = passes(&r.vm);
    finish(r, at);
}

/// emu to kvm and back, live, with the CPUID rule of snapshots.
#[test]
fn payload_migrates_live_between_emu_and_kvm() {
    require_kvm();
    let s = Scratch::new("cross");
    let r = boot(&s.0, EngineKind::Emu);
    wait_for_passes(&r.vm, 3);
    let (r, _) = migrate(r, EngineKind::Kvm, Mode::Live);
    wait_for_passes(&r.vm, passes(&r.vm) + 100);
    let (r, _) = migrate(r, EngineKind::Emu, Mode::Live);
    let at = passes(&r.vm);
    finish(r, at);
}
