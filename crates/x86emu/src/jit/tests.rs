//! The JIT against the interpreter on the same programs, in lockstep:
//! after every `run` call both CPUs must hold the same state, the same
//! instruction count and the same memory.

use iced_x86::code_asm::*;

use crate::state::CpuState;
use crate::testbus::TestBus;
use crate::{Cpu, Exit};

const CODE: u64 = 0x10_0000;
const STACK_TOP: u64 = 0x20_0000;
const HANDLER: u64 = 0x8000;
const RAM: u64 = 4 << 20;

/// A long-mode machine: 1 GiB identity-mapped with 2 MiB pages (nothing
/// above, so 0x4000_0000 page-faults), a GDT, and an IDT whose every
/// vector goes to a HLT.
fn machine(code: &[u8], jit: Option<u32>) -> (Cpu, TestBus) {
    let mut bus = TestBus::new(RAM);
    bus.write_u64(0x1000, 0x2000 | 3);
    bus.write_u64(0x2000, 0x3000 | 3);
    for i in 0..512u64 {
        bus.write_u64(0x3000 + i * 8, (i << 21) | 0x83);
    }
    bus.write_u64(0x5010, 0x0020_9a00_0000_0000);
    bus.write_u64(0x5018, 0x00cf_9200_0000_ffff);
    for v in 0..32u64 {
        let gate = 0x6000 + v * 16;
        bus.write_u64(gate, (HANDLER & 0xffff) | (0x10 << 16) | (0x8e00u64 << 32));
        bus.write_u64(gate + 8, 0);
    }
    bus.load(HANDLER, &[0xf4]);
    bus.load(CODE, code);
    let mut cpu = Cpu::standalone(RAM);
    cpu.set_jit(jit);
    let mut s = CpuState::long_mode_flat(0x1000);
    s.gdtr.base = 0x5000;
    s.gdtr.limit = 0x1f;
    s.idtr.base = 0x6000;
    s.idtr.limit = 32 * 16 - 1;
    s.rip = CODE;
    s.gpr[4] = STACK_TOP;
    s.gpr[3] = 0x1234_5678_9abc_def0;
    cpu.set_state(s);
    (cpu, bus)
}

fn assemble(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

/// Run `code` under the interpreter and under the JIT (threshold 0), in
/// steps of `budget` instructions, comparing after each step; returns the
/// JIT's CPU and the instructions it ran in translated code.
fn lockstep(code: &[u8], budget: u64) -> Cpu {
    let (mut int, mut int_bus) = machine(code, None);
    let (mut jit, mut jit_bus) = machine(code, Some(0));
    assert!(jit.jit_active(), "the JIT is not available on this host");
    for step in 0..10_000 {
        let a = int.run(&mut int_bus, budget);
        let b = jit.run(&mut jit_bus, budget);
        assert_eq!(a, b, "exit at step {step}");
        assert_eq!(int.state, jit.state, "state at step {step}");
        assert_eq!(int.instret, jit.instret, "instret at step {step}");
        let stack = (STACK_TOP - 256) as usize..STACK_TOP as usize;
        assert_eq!(
            int_bus.ram()[stack.clone()],
            jit_bus.ram()[stack],
            "stack at step {step}"
        );
        if a == Exit::Halted {
            assert!(int_bus.ram() == jit_bus.ram(), "memory differs at the end");
            assert!(jit.stats.jit_instructions > 0, "nothing ran translated");
            return jit;
        }
    }
    panic!("the program did not halt");
}

/// Run `code` in lockstep (see `lockstep`) and check that it ended in the
/// exception handler, with CR2 = `fault_address` for a page fault.
fn assert_faults(code: &[u8], fault_address: Option<u64>, what: &str) -> Cpu {
    let cpu = lockstep(code, 1000);
    if let Some(addr) = fault_address {
        assert_eq!(cpu.state.cr2, addr, "{what}");
    }
    assert_eq!(cpu.state.rip, HANDLER + 1, "{what}");
    cpu
}

#[test]
fn fault_in_a_translated_block_is_exact() {
    // Inline ALU with live flags, then a load that page-faults: RIP,
    // registers, flags (pushed in the exception frame) and CR2 as the
    // interpreter leaves them.
    let code = assemble(|a| {
        a.mov(rax, 5u64)?;
        a.add(rax, rbx)?;
        a.mov(rcx, 0x4000_0000u64)?;
        a.lea(rdx, qword_ptr(rax + rcx * 2 + 7))?;
        a.cmp(rax, rcx)?;
        a.mov(rsi, qword_ptr(rcx))?;
        a.hlt()
    });
    assert_faults(&code, Some(0x4000_0000), "load");
}

#[test]
fn store_into_the_running_block_is_seen() {
    // The block stores into the immediate of its own next instruction;
    // the new value must be executed, not the translated old one.
    let code = assemble(|a| {
        let mut imm = a.create_label();
        a.lea(rdi, qword_ptr(imm))?;
        a.add(rdi, 1)?;
        a.mov(byte_ptr(rdi), 0x42)?;
        a.set_label(&mut imm)?;
        a.mov(eax, 0x11u32)?;
        a.hlt()
    });
    let cpu = lockstep(&code, 1000);
    assert_eq!(cpu.state.gpr[0], 0x42);
}

#[test]
fn translated_code_is_dropped_when_its_page_is_written() {
    // A loop runs translated, then the program rewrites the loop body's
    // immediate and runs the loop again: the second run must use it.
    let code = assemble(|a| {
        let mut body = a.create_label();
        let mut again = a.create_label();
        let mut done = a.create_label();
        a.xor(eax, eax)?;
        a.mov(ecx, 100u32)?;
        a.xor(r8d, r8d)?;
        a.set_label(&mut body)?;
        a.add(eax, 3)?;
        a.dec(ecx)?;
        a.jnz(body)?;
        a.test(r8d, r8d)?;
        a.jnz(done)?;
        a.inc(r8d)?;
        a.lea(rdi, qword_ptr(body))?;
        a.mov(byte_ptr(rdi + 1), 5)?; // `add eax, imm32` is 05 imm32
        a.mov(ecx, 100u32)?;
        a.set_label(&mut again)?;
        a.jmp(body)?;
        a.set_label(&mut done)?;
        a.hlt()
    });
    let cpu = lockstep(&code, 1000);
    assert_eq!(cpu.state.gpr[0], 800);
}

#[test]
fn self_loops_stop_at_the_budget() {
    // A translated self-loop with budgets that end it at every possible
    // point: same instruction counts and state as the interpreter.
    let code = assemble(|a| {
        let mut l = a.create_label();
        a.mov(ecx, 500u32)?;
        a.set_label(&mut l)?;
        a.add(rax, rcx)?;
        a.adc(rdx, 0)?;
        a.imul_2(rbx, rcx)?;
        a.dec(rcx)?;
        a.jnz(l)?;
        a.hlt()
    });
    for budget in [5, 6, 7, 11, 64, 1000] {
        lockstep(&code, budget);
    }
}

#[test]
fn inline_loads_and_stores_match_the_interpreter() {
    // 32/64-bit loads and stores through the inline TLB path: misses,
    // hits, unaligned and page-crossing accesses, across many pages.
    let code = assemble(|a| {
        let mut l = a.create_label();
        a.mov(rsi, 0x30_0ff0u64)?;
        a.mov(rdi, 0x31_0000u64)?;
        a.mov(ecx, 1500u32)?;
        a.set_label(&mut l)?;
        a.mov(rax, qword_ptr(rsi + rcx * 8))?;
        a.add(rax, rcx)?;
        a.mov(dword_ptr(rdi + rcx * 8 - 3), eax)?;
        a.mov(qword_ptr(rdi + rcx * 8 + 0x8001), rax)?;
        a.mov(edx, dword_ptr(rdi + rcx * 8 + 0x7ffe))?;
        a.xor(rbx, rdx)?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.hlt()
    });
    for budget in [5, 1000] {
        lockstep(&code, budget);
    }
}

#[test]
fn inline_store_into_the_running_block_is_seen() {
    // A 32-bit register store (the inline form) into the immediate of a
    // later instruction of the same block.
    let code = assemble(|a| {
        let mut imm = a.create_label();
        a.lea(rdi, qword_ptr(imm))?;
        a.add(rdi, 1)?;
        a.mov(eax, 0x4242u32)?;
        a.mov(dword_ptr(rdi), eax)?;
        a.set_label(&mut imm)?;
        a.mov(ecx, 0x11u32)?;
        a.hlt()
    });
    let cpu = lockstep(&code, 1000);
    assert_eq!(cpu.state.gpr[1], 0x4242);
}

#[test]
fn lockstep_compares_translated_runs_and_reports_a_divergence() {
    // A loop with loads and stores, checked by lockstep as it runs.
    let code = assemble(|a| {
        let mut body = a.create_label();
        a.mov(ecx, 500u32)?;
        a.mov(rdi, 0x18_0000u64)?;
        a.set_label(&mut body)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.add(rax, rcx)?;
        a.mov(qword_ptr(rdi + 8), rax)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(body)?;
        a.hlt()
    });
    let report = std::env::temp_dir().join(format!("x86emu-lockstep-test-{}.txt", std::process::id()));
    let (mut cpu, mut bus) = machine(&code, Some(0));
    cpu.lockstep = Some(super::lockstep::Lockstep::new(&cpu, report.clone()));
    while cpu.run(&mut bus, 100) != Exit::Halted {}
    let ls = cpu.lockstep.take().unwrap();
    assert!(ls.divergence().is_none(), "{:?}", ls.divergence());
    drop(ls);
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.contains("no divergence"), "{text}");
    let compared: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("compared "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(compared > 0, "{text}");

    // A translated run that left the CPU where it was (as a broken
    // translation might) is reported with the block and what differs.
    let (mut cpu, mut bus) = machine(&code, Some(0));
    let mut ls = super::lockstep::Lockstep::new(&cpu, report.clone());
    let block = cpu.fetch_block(&mut bus).unwrap();
    let pending = ls.shadow_run(&cpu, &mut bus, &block, 100).expect("comparable");
    ls.compare(&cpu, &mut bus, &block, pending, 2);
    let text = ls.divergence().expect("divergence found").to_string();
    let _ = std::fs::remove_file(&report);
    assert!(text.contains(&format!("block at RIP {CODE:#x}")), "{text}");
    assert!(text.contains("mov ecx,1F4h"), "{text}");
    assert!(text.contains("instructions: interpreter 8 JIT 2"), "{text}");
    assert!(text.contains("rcx: interpreter 0x1f3 JIT 0x0"), "{text}");
    assert!(text.contains("rip: interpreter 0x10000f JIT 0x100000"), "{text}");
}

#[test]
fn chained_blocks_match_the_interpreter() {
    // Two blocks that jump to each other (a loop whose body branches over
    // a store every other pass): they are chained in host code, and must
    // stop at every budget exactly where the interpreter stops.
    let code = assemble(|a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(ecx, 3000u32)?;
        a.mov(rdi, 0x18_0000u64)?;
        a.set_label(&mut top)?;
        a.add(rax, rcx)?;
        a.test(ecx, 1)?;
        a.jz(skip)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.add(rdi, 8)?;
        a.set_label(&mut skip)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    for budget in [5, 6, 7, 11, 64, 1000] {
        let cpu = lockstep(&code, budget);
        if budget == 1000 {
            assert!(cpu.stats.jit_links > 0, "no chain links made");
        }
    }
}

/// Every Jcc after each kind of flag producer: an inline CMP/ADD/SUB/AND
/// (condition taken from the host flags), an inline DEC (host flags but
/// the guest CF), and POPFQ of arbitrary status flags (a handler: the
/// condition is evaluated from the guest RFLAGS).
#[test]
fn inline_branches_match_the_interpreter() {
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.mov(r9, 0x9e37_79b9_7f4a_7c15u64)?;
        a.mov(ecx, 60u32)?;
        a.set_label(&mut top)?;
        a.mov(rax, rcx)?;
        a.imul_2(rax, r9)?;
        a.mov(rbx, rax)?;
        a.rol(rbx, 17)?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 62)?;
        let mut k = 0;
        for producer in 0..6 {
            for cc in 0..16u8 {
                k += 1;
                let mut skip = a.create_label();
                match producer {
                    0 => a.cmp(rax, rbx)?,
                    1 => a.add(eax, ebx)?,
                    2 => a.sub(rbx, rax)?,
                    3 => a.and(rax, rbx)?,
                    4 => a.dec(rdx)?,
                    _ => {
                        a.mov(rsi, rax)?;
                        a.and(rsi, 0x8d5)?;
                        a.push(rsi)?;
                        a.popfq()?;
                    }
                }
                // 0F 8x rel32: Jcc with condition `cc`.
                match cc {
                    0 => a.jo(skip)?,
                    1 => a.jno(skip)?,
                    2 => a.jb(skip)?,
                    3 => a.jae(skip)?,
                    4 => a.je(skip)?,
                    5 => a.jne(skip)?,
                    6 => a.jbe(skip)?,
                    7 => a.ja(skip)?,
                    8 => a.js(skip)?,
                    9 => a.jns(skip)?,
                    10 => a.jp(skip)?,
                    11 => a.jnp(skip)?,
                    12 => a.jl(skip)?,
                    13 => a.jge(skip)?,
                    14 => a.jle(skip)?,
                    _ => a.jg(skip)?,
                }
                a.add(r10, k)?;
                a.set_label(&mut skip)?;
                a.rol(rax, 9)?;
                a.xor(rbx, rax)?;
            }
        }
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    for budget in [7, 1000] {
        let cpu = lockstep(&code, budget);
        assert_ne!(cpu.state.gpr[10], 0);
    }
}

/// PUSH/POP/CALL/RET inline: a call tree with pushes and pops (also of
/// RSP itself) and a stack that crosses pages (the slow path).
#[test]
fn inline_stack_operations_match_the_interpreter() {
    let code = assemble(|a| {
        let mut top = a.create_label();
        let mut leaf = a.create_label();
        let mut mid = a.create_label();
        let mut done = a.create_label();
        a.mov(ecx, 200u32)?;
        a.set_label(&mut top)?;
        a.push(rcx)?;
        a.push(rbx)?;
        a.call(mid)?;
        a.pop(rbx)?;
        a.pop(rdx)?;
        a.add(rbx, rdx)?;
        // Every 16th pass: the stack moves 0xf04 bytes down, so that
        // pushes and calls cross a 4 KiB page.
        a.test(ecx, 15)?;
        a.jnz(done)?;
        a.push(rsp)?;
        a.pop(rsi)?;
        a.sub(rsp, 0xf04)?;
        a.call(mid)?;
        a.push(rsp)?;
        a.pop(rsp)?;
        a.add(rsp, 0xf04)?;
        a.set_label(&mut done)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()?;
        a.set_label(&mut mid)?;
        a.push(rbp)?;
        a.mov(rbp, rsp)?;
        a.call(leaf)?;
        a.call(leaf)?;
        a.pop(rbp)?;
        a.ret()?;
        a.set_label(&mut leaf)?;
        a.push(rax)?;
        a.imul_2(rax, rbx)?;
        a.pop(rdi)?;
        a.add(rax, rdi)?;
        a.ret()
    });
    for budget in [3, 5, 1000] {
        lockstep(&code, budget);
    }
}

/// POP and RET that fault (RSP on a page the program unmaps; then a
/// non-canonical return address): RSP, RIP and CR2 as the interpreter
/// leaves them, with the exception frame below the old RSP.
#[test]
fn faulting_inline_stack_operations_are_exact() {
    // Unmap the 2 MiB page at STACK_TOP and load RSP with it.
    let unmap = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(rax, 0x3008u64)?;
        a.mov(qword_ptr(rax), 0)?;
        a.mov(rax, STACK_TOP)?;
        a.invlpg(byte_ptr(rax))?;
        a.mov(rsp, rax)?;
        a.nop()?;
        Ok(())
    };
    let pop = assemble(|a| {
        unmap(a)?;
        a.pop(rcx)?;
        a.hlt()
    });
    let ret = assemble(|a| {
        unmap(a)?;
        a.ret()
    });
    for code in [pop, ret] {
        assert_faults(&code, Some(STACK_TOP), "pop/ret");
    }
    let non_canonical = assemble(|a| {
        a.mov(rax, 0x8000_0000_0000_0000u64)?;
        a.push(rax)?;
        a.ret()
    });
    let cpu = assert_faults(&non_canonical, None, "non-canonical ret");
    // The frame (error code included) below the 16-byte-aligned old RSP.
    assert_eq!(
        cpu.state.gpr[4],
        ((STACK_TOP - 8) & !15) - 6 * 8,
        "the RET left RSP alone"
    );
}

/// MOVZX/MOVSX/MOVSXD, MOV r8/r16 loads and stores (AH and REX byte
/// registers too) and MOV [m], imm of every size, on values with the sign
/// bits set and clear, at addresses that walk across page boundaries.
#[test]
fn inline_narrow_moves_match_the_interpreter() {
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.mov(rsi, 0x30_0ff0u64)?;
        a.mov(r9, 0x9e37_79b9_7f4a_7c15u64)?;
        a.mov(ecx, 600u32)?;
        a.set_label(&mut top)?;
        a.mov(rax, rcx)?;
        a.imul_2(rax, r9)?;
        a.mov(qword_ptr(rsi + rcx * 8), rax)?;
        a.mov(dword_ptr(rsi + rcx * 4 + 0x1001), -5i32)?;
        a.mov(qword_ptr(rsi + rcx * 2 + 0x2003), -0x7000_0000i32)?;
        a.mov(word_ptr(rsi + rcx * 2 + 0x3001), 0x8123u32)?;
        a.mov(byte_ptr(rsi + rcx + 0x3801), 0x9au32)?;
        a.movzx(edx, byte_ptr(rsi + rcx * 8 + 7))?;
        a.movzx(rdi, word_ptr(rsi + rcx * 8 + 5))?;
        a.movsx(ebx, byte_ptr(rsi + rcx * 8 + 7))?;
        a.movsx(r8, word_ptr(rsi + rcx * 2 + 0x3001))?;
        a.movsx(r10d, word_ptr(rsi + rcx * 8 + 3))?;
        a.movsx(r11, byte_ptr(rsi + rcx + 0x3801))?;
        a.movsxd(r12, dword_ptr(rsi + rcx * 4 + 0x1001))?;
        a.add(rdx, rdi)?;
        a.add(rbx, r8)?;
        a.add(r10, r11)?;
        a.add(rbx, r12)?;
        a.mov(ah, byte_ptr(rsi + rcx * 8 + 6))?;
        a.mov(dil, byte_ptr(rsi + rcx * 8 + 2))?;
        a.mov(r13w, word_ptr(rsi + rcx * 8 + 1))?;
        a.mov(bx, word_ptr(rsi + rcx * 2 + 0x3001))?;
        a.mov(byte_ptr(rsi + rcx * 4 + 0x5000), ah)?;
        a.mov(byte_ptr(rsi + rcx * 4 + 0x5001), dil)?;
        a.mov(word_ptr(rsi + rcx * 4 + 0x5002), r13w)?;
        a.movzx(edx, ah)?;
        a.movsx(r15, dil)?;
        a.movzx(ebp, r13w)?;
        a.movsx(edi, bh)?;
        a.add(rbx, qword_ptr(rsi + rcx * 4 + 0x5000))?;
        a.add(rbx, rdx)?;
        a.add(rbx, rdi)?;
        a.add(rbx, r15)?;
        a.add(rbx, rbp)?;
        a.add(rbx, rax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    for budget in [4, 1000] {
        let cpu = lockstep(&code, budget);
        if budget == 1000 {
            assert!(cpu.stats.jit_instructions > 10_000, "{}", cpu.stats.jit_instructions);
        }
    }
}

/// Narrow loads and stores that page-fault: registers, memory and CR2 as
/// the interpreter leaves them.
#[test]
fn faulting_inline_narrow_moves_are_exact() {
    type Form = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let programs: [Form; 4] = [
        |a| a.movzx(eax, word_ptr(rcx + 0xffe)),
        |a| a.movsx(rax, byte_ptr(rcx)),
        |a| a.mov(byte_ptr(rcx + 3), ah),
        |a| a.mov(qword_ptr(rcx + 0x10), 7),
    ];
    for (k, form) in programs.into_iter().enumerate() {
        let code = assemble(|a| {
            a.mov(rax, 0x1234u64)?;
            a.mov(rcx, 0x4000_0000u64)?;
            a.add(rax, rbx)?;
            form(a)?;
            a.hlt()
        });
        let cpu = assert_faults(&code, None, &format!("form {k}"));
        assert!(cpu.state.cr2 >= 0x4000_0000, "form {k}");
    }
}

/// SHL/SHR/SAR/ROL/ROR r, imm8 with every count (masked; 0 keeps the flags), the
/// flags read by PUSHFQ and by SETcc/CMOVcc, and SETcc/CMOVcc for every
/// condition on arbitrary flags (from POPFQ).
#[test]
fn inline_shifts_setcc_and_cmov_match_the_interpreter() {
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.mov(r9, 0x9e37_79b9_7f4a_7c15u64)?;
        a.mov(ecx, 40u32)?;
        a.set_label(&mut top)?;
        a.mov(rax, rcx)?;
        a.imul_2(rax, r9)?;
        for count in [0u32, 1, 2, 7, 31, 32, 33, 63, 64, 65, 255] {
            a.mov(rdx, rax)?;
            a.mov(rbx, rax)?;
            a.mov(rsi, rax)?;
            a.shl(rdx, count)?;
            a.pushfq()?;
            a.shr(ebx, count)?;
            a.pushfq()?;
            a.sar(rsi, count)?;
            a.pushfq()?;
            a.sar(ebx, count)?;
            a.seto(dil)?;
            a.shr(rdx, count)?;
            a.setc(bh)?;
            a.shl(esi, count)?;
            a.cmovo(r10, rsi)?;
            a.rol(edi, count)?;
            a.pushfq()?;
            a.ror(r10, count)?;
            a.pushfq()?;
            a.ror(ebx, count)?;
            a.rol(rdx, count)?;
            a.setc(r8b)?;
            a.seto(r8b)?;
            a.pop(r12)?;
            a.pop(r13)?;
            a.add(r11, r12)?;
            a.add(r11, r13)?;
            a.add(r11, r10)?;
            a.add(r11, rdx)?;
            a.add(r11, rbx)?;
            a.add(r11, rsi)?;
            a.add(r11, rdi)?;
            a.pop(rdx)?;
            a.pop(rbx)?;
            a.pop(rsi)?;
            a.xor(r11, rdx)?;
            a.add(r11, rbx)?;
            a.add(r11, rsi)?;
            a.rol(rax, 11)?;
        }
        a.mov(rsi, rax)?;
        a.and(rsi, 0x8d5)?;
        a.push(rsi)?;
        a.popfq()?;
        a.seto(al)?;
        a.setno(bl)?;
        a.setb(dl)?;
        a.setae(dil)?;
        a.sete(r8b)?;
        a.setne(ah)?;
        a.setbe(bh)?;
        a.seta(dh)?;
        a.sets(r10b)?;
        a.setns(r11b)?;
        a.setp(r12b)?;
        a.setnp(r13b)?;
        a.setl(r14b)?;
        a.setge(r15b)?;
        a.setle(sil)?;
        a.setg(bpl)?;
        a.cmovl(r12, rcx)?;
        a.cmovg(r13d, ecx)?;
        a.cmova(r14d, eax)?;
        a.cmovbe(r15, r9)?;
        a.cmovp(esi, edi)?;
        a.cmovnp(rbp, rax)?;
        a.add(r11, r12)?;
        a.add(r11, rax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    for budget in [3, 1000] {
        let cpu = lockstep(&code, budget);
        if budget == 1000 {
            assert!(cpu.stats.jit_instructions > 5_000, "{}", cpu.stats.jit_instructions);
        }
    }
}

/// ADD/SUB/AND/OR/XOR/CMP/TEST with a memory operand (r, [m]; [m], r;
/// [m], imm; byte [m], imm8), flags read by PUSHFQ and by Jcc, at
/// addresses that cross pages; and one that page-faults.
#[test]
fn inline_alu_with_memory_matches_the_interpreter() {
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.mov(rsi, 0x30_0ff0u64)?;
        a.mov(r9, 0x9e37_79b9_7f4a_7c15u64)?;
        a.mov(ecx, 300u32)?;
        a.set_label(&mut top)?;
        a.mov(rax, rcx)?;
        a.imul_2(rax, r9)?;
        a.mov(qword_ptr(rsi + rcx * 8), rax)?;
        a.add(rbx, qword_ptr(rsi + rcx * 8 + 3))?;
        a.pushfq()?;
        a.sub(edx, dword_ptr(rsi + rcx * 8 + 1))?;
        a.pushfq()?;
        a.xor(qword_ptr(rsi + rcx * 4 + 0x2001), rbx)?;
        a.pushfq()?;
        a.and(dword_ptr(rsi + rcx * 4 + 0x2005), edx)?;
        a.or(qword_ptr(rsi + rcx * 2 + 0x3000), -3)?;
        a.pushfq()?;
        a.add(dword_ptr(rsi + rcx * 2 + 0x3003), 0x7fff_0000)?;
        a.pushfq()?;
        a.sub(byte_ptr(rsi + rcx + 0x3801), 0x81)?;
        a.pushfq()?;
        a.cmp(byte_ptr(rsi + rcx * 8 + 5), 0x40)?;
        a.pushfq()?;
        a.test(byte_ptr(rsi + rcx * 8 + 6), 0x11)?;
        a.pushfq()?;
        a.cmp(rdx, qword_ptr(rsi + rcx * 8 + 2))?;
        a.pushfq()?;
        a.test(dword_ptr(rsi + rcx * 8 + 4), eax)?;
        a.pushfq()?;
        a.cmp(qword_ptr(rsi + rcx * 8 + 4), 0x1234)?;
        a.pushfq()?;
        for _ in 0..11 {
            a.pop(rdi)?;
            a.add(r11, rdi)?;
            a.rol(r11, 5)?;
        }
        a.or(rbx, qword_ptr(rsi + rcx * 4 + 0x2001))?;
        a.and(edx, dword_ptr(rsi + rcx * 2 + 0x3003))?;
        let mut skip = a.create_label();
        a.cmp(eax, dword_ptr(rsi + rcx * 8 + 6))?;
        a.jl(skip)?;
        a.inc(r10)?;
        a.set_label(&mut skip)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    for budget in [4, 1000] {
        let cpu = lockstep(&code, budget);
        if budget == 1000 {
            assert!(cpu.stats.jit_instructions > 5_000, "{}", cpu.stats.jit_instructions);
        }
    }
    for store in [false, true] {
        let code = assemble(|a| {
            a.mov(rcx, 0x4000_0000u64)?;
            a.add(rax, rbx)?;
            if store {
                a.add(qword_ptr(rcx + 8), rax)?;
            } else {
                a.cmp(eax, dword_ptr(rcx + 8))?;
            }
            a.hlt()
        });
        assert_faults(&code, Some(0x4000_0008), if store { "alu store" } else { "alu load" });
    }
}

/// An inline read-modify-write (ADD [m], imm) into the immediate of a
/// later instruction of the same block: the new value must be executed.
#[test]
fn inline_alu_store_into_the_running_block_is_seen() {
    let code = assemble(|a| {
        let mut imm = a.create_label();
        a.lea(rdi, qword_ptr(imm))?;
        a.add(rdi, 1)?;
        a.add(dword_ptr(rdi), 0x100)?;
        a.set_label(&mut imm)?;
        a.mov(ecx, 0x11u32)?;
        a.hlt()
    });
    let cpu = lockstep(&code, 1000);
    assert_eq!(cpu.state.gpr[1], 0x111);
}

#[test]
fn chain_links_are_made_again_after_their_epoch_ends() {
    // The two-block loop of chained_blocks_match_the_interpreter, run in
    // slices; between slices
    // the decode cache's epoch moves on (as when any translated block is
    // dropped), which kills every link. The links must be made again, so
    // the loop keeps running chained: few entries from the dispatcher.
    let code = assemble(|a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(ecx, 200_000u32)?;
        a.set_label(&mut top)?;
        a.add(rax, rcx)?;
        a.test(ecx, 1)?;
        a.jz(skip)?;
        a.add(rdx, 3)?;
        a.set_label(&mut skip)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    let (mut cpu, mut bus) = machine(&code, Some(0));
    for _ in 0..20 {
        cpu.run(&mut bus, 20_000);
        cpu.cache.epoch += 1;
    }
    let (entries, instructions) = (cpu.stats.jit_entries, cpu.stats.jit_instructions);
    assert!(
        instructions > 350_000,
        "only {instructions} instructions ran translated"
    );
    // Unchained, every block run is an entry: about 2.5 instructions each.
    assert!(
        instructions / entries.max(1) > 20,
        "{entries} entries for {instructions} translated instructions: the links were not made again"
    );
}

/// MUL/IMUL r32/r64 into RDX:RAX, NEG/NOT, and SHLD/SHRD r, r, imm8 and CL, for
/// counts 0..=65 (CL is masked, so 32, 64, 65 wrap), flags read by PUSHFQ,
/// SETcc and a Jcc; the accumulator and count registers as sources too.
#[test]
fn inline_mul_and_double_shifts_match_the_interpreter() {
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.mov(r9, 0x9e37_79b9_7f4a_7c15u64)?;
        a.mov(r15d, 70u32)?;
        a.set_label(&mut top)?;
        a.mov(rax, r15)?;
        a.imul_2(rax, r9)?;
        a.mov(rbx, rax)?;
        a.rol(rbx, 23)?;
        a.mov(rsi, rax)?;
        a.mul(rbx)?;
        a.pushfq()?;
        a.add(r11, rdx)?;
        a.imul(rsi)?;
        a.pushfq()?;
        a.xor(r11, rdx)?;
        a.mul(ebx)?;
        a.seto(r10b)?;
        a.add(r11, r10)?;
        a.imul(esi)?;
        a.pushfq()?;
        a.imul(r15)?;
        a.pushfq()?;
        a.imul(r15d)?;
        a.pushfq()?;
        a.mul(rax)?;
        a.pushfq()?;
        a.imul(edx)?;
        a.pushfq()?;
        // NEG/NOT, of 0 too (CF clear) and of the most negative value (OF).
        a.neg(rsi)?;
        a.pushfq()?;
        a.not(esi)?;
        a.neg(ebx)?;
        a.pushfq()?;
        a.not(rbx)?;
        a.mov(edi, 0u32)?;
        a.neg(rdi)?;
        a.pushfq()?;
        a.mov(edi, 0x8000_0000u32)?;
        a.neg(edi)?;
        a.pushfq()?;
        a.add(r11, rsi)?;
        a.add(r11, rbx)?;
        for _ in 0..11 {
            a.pop(r12)?;
            a.add(r11, r12)?;
        }
        a.add(r11, rax)?;
        a.add(r11, rdx)?;
        // Small multipliers: no overflow, CF=OF=0.
        a.mov(eax, 3u32)?;
        a.mov(ecx, 5u32)?;
        a.imul(rcx)?;
        a.pushfq()?;
        a.mul(ecx)?;
        a.pushfq()?;
        a.pop(r12)?;
        a.add(r11, r12)?;
        a.pop(r12)?;
        a.add(r11, r12)?;
        for count in [0u32, 1, 7, 31, 32, 33, 63, 64] {
            a.mov(rdi, rsi)?;
            a.mov(r8, rbx)?;
            a.shld(rdi, rbx, count)?;
            a.pushfq()?;
            a.shrd(r8d, esi, count)?;
            a.pushfq()?;
            a.shrd(rsi, r8, count)?;
            a.seto(r10b)?;
            a.shld(ebx, edi, count)?;
            a.setc(r10b)?;
            a.pushfq()?;
            for _ in 0..3 {
                a.pop(r12)?;
                a.add(r11, r12)?;
            }
            a.add(r11, rdi)?;
            a.add(r11, r8)?;
            a.add(r11, r10)?;
        }
        // By CL: the loop counter's low bits run through 0..=69 (masked).
        a.lea(ecx, dword_ptr(r15 - 3))?;
        a.mov(rdi, rsi)?;
        a.mov(edx, ebx)?;
        a.shld(rdi, rbx, cl)?;
        a.pushfq()?;
        a.shrd(rbx, rsi, cl)?;
        a.pushfq()?;
        a.shld(edx, esi, cl)?;
        a.pushfq()?;
        a.shrd(esi, edi, cl)?;
        a.pushfq()?;
        // A zero count keeps the flags of the ADD, read by the Jcc.
        a.add(r11, rdi)?;
        a.shld(rcx, rcx, cl)?;
        a.shrd(edx, ecx, cl)?;
        let mut odd = a.create_label();
        a.js(odd)?;
        a.add(r11, 1)?;
        a.set_label(&mut odd)?;
        for _ in 0..4 {
            a.pop(r12)?;
            a.add(r11, r12)?;
        }
        a.add(r11, rbx)?;
        a.add(r11, rdx)?;
        a.add(r11, rsi)?;
        a.add(r11, rcx)?;
        a.dec(r15d)?;
        a.jnz(top)?;
        a.hlt()
    });
    for budget in [3, 1000] {
        let cpu = lockstep(&code, budget);
        if budget == 1000 {
            assert!(cpu.stats.jit_instructions > 5_000, "{}", cpu.stats.jit_instructions);
        }
    }
}

/// SHL/SHR/SAR/ROL/ROR r32/r64, CL for CL = 0..=69 (masked to 31 or 63),
/// flags read by PUSHFQ, SETcc and a Jcc after a zero count; CL as the
/// shifted register too.
#[test]
fn inline_shifts_by_cl_match_the_interpreter() {
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.mov(r9, 0x9e37_79b9_7f4a_7c15u64)?;
        a.mov(r15d, 70u32)?;
        a.set_label(&mut top)?;
        a.mov(rax, r15)?;
        a.imul_2(rax, r9)?;
        a.lea(ecx, dword_ptr(r15 - 1))?;
        a.mov(rdx, rax)?;
        a.mov(rbx, rax)?;
        a.mov(rsi, rax)?;
        a.mov(rdi, rax)?;
        a.shl(rdx, cl)?;
        a.pushfq()?;
        a.shr(ebx, cl)?;
        a.pushfq()?;
        a.sar(rsi, cl)?;
        a.pushfq()?;
        a.sar(edi, cl)?;
        a.seto(r10b)?;
        a.shr(rdi, cl)?;
        a.setc(r10b)?;
        a.shl(esi, cl)?;
        a.pushfq()?;
        a.rol(edx, cl)?;
        a.pushfq()?;
        a.ror(rbx, cl)?;
        a.pushfq()?;
        a.rol(rsi, cl)?;
        a.pushfq()?;
        a.ror(edi, cl)?;
        a.pushfq()?;
        // A zero count keeps the flags of the ADD, read by the Jcc.
        a.add(r11, rax)?;
        a.shl(rcx, cl)?;
        a.rol(ecx, cl)?;
        let mut sign = a.create_label();
        a.js(sign)?;
        a.add(r11, 1)?;
        a.set_label(&mut sign)?;
        for _ in 0..8 {
            a.pop(r12)?;
            a.add(r11, r12)?;
        }
        a.add(r11, rbx)?;
        a.add(r11, rdx)?;
        a.add(r11, rsi)?;
        a.add(r11, rdi)?;
        a.add(r11, rcx)?;
        a.add(r11, r10)?;
        a.dec(r15d)?;
        a.jnz(top)?;
        a.hlt()
    });
    for budget in [3, 1000] {
        let cpu = lockstep(&code, budget);
        if budget == 1000 {
            assert!(cpu.stats.jit_instructions > 3_000, "{}", cpu.stats.jit_instructions);
        }
    }
}

/// Set an MSR (FS_BASE, GS_BASE, KERNEL_GS_BASE) to `value` with WRMSR.
fn wrmsr(a: &mut CodeAssembler, msr: u32, value: u64) -> Result<(), IcedError> {
    a.mov(ecx, msr)?;
    a.mov(eax, value as u32)?;
    a.mov(edx, (value >> 32) as u32)?;
    a.wrmsr()
}

/// Loads, stores, MOVZX and ALU with an FS or GS segment (per-CPU and TLS
/// accesses): the base is read at run time (SWAPGS changes it every pass),
/// some accesses cross pages; then a page fault and a non-canonical #GP
/// through a segment base.
#[test]
fn inline_fs_gs_accesses_match_the_interpreter() {
    let code = assemble(|a| {
        let mut top = a.create_label();
        wrmsr(a, 0xc000_0100, 0x30_0000)?;
        wrmsr(a, 0xc000_0101, 0x2f_e000)?;
        wrmsr(a, 0xc000_0102, 0x2f_c008)?;
        a.mov(r9, 0x9e37_79b9_7f4a_7c15u64)?;
        a.mov(r15d, 300u32)?;
        a.xor(esi, esi)?;
        a.set_label(&mut top)?;
        a.mov(rax, r15)?;
        a.imul_2(rax, r9)?;
        a.mov(qword_ptr(rsi + r15 * 8).fs(), rax)?;
        a.mov(qword_ptr(r15 * 8 + 0xffd).gs(), rax)?;
        a.mov(rbx, qword_ptr(r15 * 4 + 0x10).gs())?;
        a.add(qword_ptr(r15 * 8 + 0x800).gs(), rbx)?;
        a.pushfq()?;
        a.sub(edx, dword_ptr(r15 * 8 + 3).fs())?;
        a.pushfq()?;
        a.movzx(ecx, byte_ptr(r15 + 0x1001).gs())?;
        a.movsxd(rdi, dword_ptr(r15 * 2 + 0xffe).fs())?;
        a.mov(word_ptr(r15 * 2 + 0x600).gs(), cx)?;
        a.mov(dword_ptr(r15 * 4 + 0x700).fs(), 0x1234_5678)?;
        a.cmp(qword_ptr(r15 * 8 + 0x800).gs(), rdi)?;
        a.pushfq()?;
        a.mov(r8d, dword_ptr(0x10).fs())?;
        for _ in 0..3 {
            a.pop(r12)?;
            a.add(r11, r12)?;
        }
        a.add(r11, rbx)?;
        a.add(r11, rcx)?;
        a.add(r11, rdx)?;
        a.add(r11, rdi)?;
        a.add(r11, r8)?;
        a.swapgs()?;
        a.dec(r15d)?;
        a.jnz(top)?;
        a.hlt()
    });
    for budget in [4, 1000] {
        let cpu = lockstep(&code, budget);
        if budget == 1000 {
            assert!(cpu.stats.jit_instructions > 3_000, "{}", cpu.stats.jit_instructions);
        }
    }
    for (use_fs, base, fault) in [
        (false, 0x4000_0000u64, 14u8),
        (true, 0x3fff_fff0, 14),
        (true, 0x7fff_ffff_fff8, 13),
        (false, 0x8000_0000_0000_0000, 13),
    ] {
        let code = assemble(|a| {
            wrmsr(a, if use_fs { 0xc000_0100 } else { 0xc000_0101 }, base)?;
            a.mov(rcx, 0x18u64)?;
            a.add(rax, rbx)?;
            match (use_fs, fault) {
                (false, 14) => a.add(qword_ptr(rcx - 0x10).gs(), rax)?,
                (true, 14) => a.mov(dword_ptr(rcx).fs(), eax)?,
                (true, _) => a.movzx(eax, word_ptr(rcx).fs())?,
                (false, _) => a.mov(rax, qword_ptr(rcx).gs())?,
            }
            a.hlt()
        });
        let cpu = assert_faults(&code, None, "fs/gs");
        if fault == 14 {
            assert_eq!(cpu.state.cr2, base.wrapping_add(if use_fs { 0x18 } else { 8 }));
        } else {
            assert_eq!(cpu.state.cr2, 0, "a #GP, not a page fault");
        }
    }
}

#[test]
fn released_code_memory_is_decoded_and_translated_again() {
    // An idle vCPU gives its decoded blocks, slot pages and JIT code pages
    // back; running on must decode and translate again and end as the
    // interpreter does.
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.mov(ecx, 20_000u32)?;
        a.set_label(&mut top)?;
        a.add(rax, rcx)?;
        a.xor(rdx, rax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    let (mut int, mut int_bus) = machine(&code, None);
    let (mut jit, mut jit_bus) = machine(&code, Some(0));
    for slice in 1..=20 {
        int.run(&mut int_bus, 10_000);
        jit.run(&mut jit_bus, 10_000);
        int.release_code_memory();
        jit.release_code_memory();
        assert_eq!(int.state, jit.state);
        assert_eq!(int.instret, jit.instret);
        if int.state.events.halted {
            // The loop was translated again in every slice.
            let translated = jit.stats.jit_blocks;
            assert!(translated >= slice, "{translated} blocks translated in {slice} slices");
            return;
        }
    }
    panic!("the loop did not end");
}

/// Set CR4.OSFXSR (SSE on), as the first instructions of a program.
fn enable_sse(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, cr4)?;
    a.or(rax, 0x200)?;
    a.mov(cr4, rax)
}

/// Whole-XMM moves, integer and bitwise ops and PMOVMSKB (the inner loop
/// of glibc's SSE2 string functions), with register and memory sources,
/// aligned and unaligned, within a page and across one.
#[test]
fn inline_sse_matches_the_interpreter() {
    let code = assemble(|a| {
        enable_sse(a)?;
        let mut fill = a.create_label();
        let mut top = a.create_label();
        // 16 KiB of pseudo-random bytes at 0x30_0000, some of them zero.
        a.mov(rsi, 0x30_0000u64)?;
        a.mov(rax, 0x9e37_79b9_7f4a_7c15u64)?;
        a.mov(ecx, 2048u32)?;
        a.set_label(&mut fill)?;
        a.imul_2(rax, rax)?;
        a.add(rax, rcx)?;
        a.mov(qword_ptr(rsi + rcx * 8 - 8), rax)?;
        a.dec(ecx)?;
        a.jnz(fill)?;
        a.mov(byte_ptr(rsi + 0x777), 0)?;
        a.mov(ecx, 900u32)?;
        a.pxor(xmm7, xmm7)?;
        a.set_label(&mut top)?;
        a.mov(rdx, rcx)?;
        a.shl(rdx, 4)?;
        a.movdqa(xmm0, xmmword_ptr(rsi + rdx))?;
        a.movdqu(xmm1, xmmword_ptr(rsi + rcx + 3))?;
        a.movdqu(xmm2, xmmword_ptr(rsi + 0xff9))?;
        a.movaps(xmm3, xmm0)?;
        a.pminub(xmm3, xmm1)?;
        a.pcmpeqb(xmm3, xmm7)?;
        a.pmovmskb(eax, xmm3)?;
        a.movdqa(xmm4, xmm1)?;
        a.pcmpeqb(xmm4, xmmword_ptr(rsi + rdx + 0x10))?;
        a.pcmpeqw(xmm4, xmm2)?;
        a.pcmpeqd(xmm2, xmm0)?;
        a.pmaxub(xmm2, xmmword_ptr(rsi + rdx + 0x20))?;
        a.por(xmm4, xmm2)?;
        a.pand(xmm4, xmm0)?;
        a.pandn(xmm4, xmm1)?;
        a.pxor(xmm4, xmmword_ptr(rsi + rdx + 0x30))?;
        a.xorps(xmm5, xmm4)?;
        a.orps(xmm5, xmm1)?;
        a.andps(xmm5, xmm0)?;
        a.andnpd(xmm6, xmm5)?;
        a.paddb(xmm6, xmm1)?;
        a.paddw(xmm6, xmm0)?;
        a.paddd(xmm6, xmmword_ptr(rsi + rdx + 0x40))?;
        a.paddq(xmm6, xmm4)?;
        a.psubb(xmm5, xmm6)?;
        a.psubw(xmm5, xmm1)?;
        a.psubd(xmm5, xmm0)?;
        a.psubq(xmm5, xmmword_ptr(rsi + rdx + 0x50))?;
        a.pmovmskb(r9, xmm5)?;
        a.pmovmskb(r10d, xmm6)?;
        a.add(rax, r9)?;
        a.add(rax, r10)?;
        a.add(rbx, rax)?;
        a.movdqu(xmmword_ptr(rsi + rcx + 0x4001), xmm5)?;
        a.movdqa(xmmword_ptr(rsi + rdx + 0x8000), xmm6)?;
        a.movups(xmmword_ptr(rsi + 0x2ff8), xmm4)?;
        a.movapd(xmm8, xmm6)?;
        a.movupd(xmm9, xmmword_ptr(rsi + rcx + 0x4001))?;
        a.pxor(xmm8, xmm9)?;
        a.movdqu(xmmword_ptr(rsi + rdx + 0x9000), xmm8)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    for budget in [5, 1000] {
        let cpu = lockstep(&code, budget);
        if budget == 1000 {
            assert!(cpu.stats.jit_instructions > 20_000, "{}", cpu.stats.jit_instructions);
        }
    }
}

/// SSE forms that fault: misaligned MOVDQA/PCMPEQB operands (#GP), a
/// page fault on a load and on a store, SSE with CR0.TS (#NM) and without
/// CR4.OSFXSR (#UD), in translated code (threshold 0) after a loop of the
/// same forms ran there without faulting; registers, memory and CR2 as
/// the interpreter leaves them.
#[test]
fn faulting_inline_sse_is_exact() {
    type Form = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let forms: [(Form, Form); 6] = [
        (|a| a.mov(rcx, 0x30_0008u64), |a| a.movdqa(xmm1, xmmword_ptr(rcx))),
        (|a| a.mov(rcx, 0x30_0004u64), |a| a.pcmpeqb(xmm1, xmmword_ptr(rcx + 4))),
        (
            |a| a.mov(rcx, 0x3f_fff8u64),
            |a| a.movdqu(xmm1, xmmword_ptr(rcx + 0x4000_0000)),
        ),
        (
            |a| a.mov(rcx, 0x3f_fff0u64),
            |a| a.movdqa(xmmword_ptr(rcx + 0x4000_0000), xmm1),
        ),
        (
            |a| {
                a.mov(rax, cr0)?;
                a.or(rax, 8)?;
                a.mov(cr0, rax)
            },
            |a| a.pmovmskb(eax, xmm1),
        ),
        (
            |a| {
                a.mov(rax, cr4)?;
                a.and(rax, !0x200)?;
                a.mov(cr4, rax)
            },
            |a| a.por(xmm1, xmm2),
        ),
    ];
    for (k, (setup, form)) in forms.into_iter().enumerate() {
        let code = assemble(|a| {
            enable_sse(a)?;
            let mut top = a.create_label();
            a.mov(rcx, 0x30_0000u64)?;
            a.mov(edx, 300u32)?;
            a.mov(rbx, 0x30_0000u64)?;
            a.set_label(&mut top)?;
            // The same forms with good operands first.
            a.movdqa(xmm1, xmmword_ptr(rbx))?;
            a.pcmpeqb(xmm1, xmmword_ptr(rbx + 0x10))?;
            a.pmovmskb(eax, xmm1)?;
            a.movdqu(xmmword_ptr(rbx + 0x21), xmm1)?;
            a.dec(edx)?;
            a.jnz(top)?;
            setup(a)?;
            a.mov(eax, 0x55u32)?;
            form(a)?;
            a.mov(eax, 0x66u32)?;
            a.hlt()
        });
        let cpu = assert_faults(&code, None, &format!("form {k}"));
        assert_eq!(cpu.state.gpr[0], 0x55, "form {k}: the faulting form changed nothing");
        if k == 2 || k == 3 {
            assert!(cpu.state.cr2 >= 0x4000_0000, "form {k}: cr2 {:#x}", cpu.state.cr2);
        }
    }
}

/// A 16-byte SSE store into a later instruction of the same block (the
/// store's inline lookup must see the code page).
#[test]
fn inline_sse_store_into_the_running_block_is_seen() {
    let code = assemble(|a| {
        enable_sse(a)?;
        let mut imm = a.create_label();
        a.lea(rdi, qword_ptr(imm))?;
        a.movdqu(xmm0, xmmword_ptr(rdi))?;
        a.movdqu(xmmword_ptr(rsp - 64), xmm0)?;
        a.mov(dword_ptr(rsp - 63), 0x4242)?;
        a.movdqu(xmm0, xmmword_ptr(rsp - 64))?;
        a.movdqu(xmmword_ptr(rdi), xmm0)?;
        a.set_label(&mut imm)?;
        a.mov(ecx, 0x11u32)?;
        a.hlt()?;
        for _ in 0..16 {
            a.nop()?;
        }
        Ok(())
    });
    let cpu = lockstep(&code, 1000);
    assert_eq!(cpu.state.gpr[1], 0x4242);
}
