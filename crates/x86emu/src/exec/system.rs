//! System instructions: control/debug/segment registers, descriptor
//! tables, far transfers, interrupts and returns, MSRs, CPUID, I/O, HLT.
//!
//! The larger groups live in `system/`: `segment` (selector loads and
//! descriptor tables), `far` (far JMP/CALL/RET, IRET), `control` (CRn, DRn,
//! INVLPG), `msr`, `fastcall` (SYSCALL, SYSENTER, SWAPGS) and `io`. This
//! file registers everything and holds the small instructions.

use iced_x86::{Code, Instruction, Mnemonic as M, OpKind, Register};

use super::Registry;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{vector, ExecResult, Fault};
use crate::interrupt::EventKind;
use crate::state::{cr, flags, reg, Seg};

mod control;
mod far;
mod fastcall;
pub mod io;
pub mod msr;
pub mod segment;

pub use io::check_io_permission;

pub fn register(r: &mut Registry) {
    const G: &str = "system";
    // Segments and descriptor tables.
    r.add_all(&[M::Lds, M::Les, M::Lfs, M::Lgs, M::Lss], G, segment::load_far_pointer);
    r.add_all(&[M::Lgdt, M::Lidt], G, segment::load_table);
    r.add_all(&[M::Sgdt, M::Sidt], G, segment::store_table);
    r.add(M::Lldt, G, segment::lldt);
    r.add(M::Ltr, G, segment::ltr);
    r.add_all(&[M::Sldt, M::Str], G, segment::store_selector);
    r.add_all(&[M::Lar, M::Lsl], G, segment::lar_lsl);
    r.add_all(&[M::Verr, M::Verw], G, segment::verr_verw);
    // Far transfers (far JMP/CALL come through flow.rs).
    r.add(M::Retf, G, far::retf);
    r.add_all(&[M::Iret, M::Iretd, M::Iretq], G, far::iret);
    // Control registers, caches and TLB.
    r.add(M::Clts, G, control::clts);
    r.add(M::Lmsw, G, control::lmsw);
    r.add(M::Smsw, G, control::smsw);
    r.add(M::Invlpg, G, control::invlpg);
    r.add_all(&[M::Invd, M::Wbinvd, M::Wbnoinvd], G, privileged_nop);
    r.add(M::Clflush, G, clflush);
    r.add_all(
        &[
            M::Prefetch,
            M::Prefetchnta,
            M::Prefetcht0,
            M::Prefetcht1,
            M::Prefetcht2,
            M::Prefetchw,
            M::Lfence,
            M::Sfence,
            M::Pause,
        ],
        G,
        nop,
    );
    r.add(M::Mfence, G, mfence);
    // Instructions of features not offered through CPUID, and the
    // undefined opcodes: #UD without counting them as unimplemented.
    r.add_all(
        &[
            M::Ud0,
            M::Ud1,
            M::Ud2,
            M::Xgetbv,
            M::Xsetbv,
            M::Xsave,
            M::Xsave64,
            M::Xsavec,
            M::Xsavec64,
            M::Xsaveopt,
            M::Xsaveopt64,
            M::Xsaves,
            M::Xsaves64,
            M::Xrstor,
            M::Xrstor64,
            M::Xrstors,
            M::Xrstors64,
            M::Monitor,
            M::Mwait,
            M::Rdpid,
            M::Rsm,
            M::Rdfsbase,
            M::Rdgsbase,
            M::Wrfsbase,
            M::Wrgsbase,
            M::Invpcid,
            M::Clflushopt,
            M::Clwb,
        ],
        G,
        undefined,
    );
    r.add_all(&[M::Stac, M::Clac], G, stac_clac);
    // Interrupts.
    r.add(M::Int, G, int_n);
    r.add(M::Int3, G, int3);
    r.add(M::Into, G, into);
    r.add(M::Int1, G, int1);
    // Fast system calls.
    r.add(M::Syscall, G, fastcall::syscall);
    r.add_all(&[M::Sysret, M::Sysretq], G, fastcall::sysret);
    r.add(M::Sysenter, G, fastcall::sysenter);
    r.add_all(&[M::Sysexit, M::Sysexitq], G, fastcall::sysexit);
    r.add(M::Swapgs, G, fastcall::swapgs);
    // MSRs, identification, time.
    r.add(M::Rdmsr, G, msr::rdmsr);
    r.add(M::Wrmsr, G, msr::wrmsr);
    r.add(M::Cpuid, G, cpuid);
    r.add(M::Rdtsc, G, rdtsc);
    r.add(M::Rdtscp, G, rdtscp);
    r.add(M::Rdpmc, G, rdpmc);
    // Flags, interrupts flag, halting.
    r.add(M::Hlt, G, hlt);
    r.add(M::Cli, G, cli);
    r.add(M::Sti, G, sti);
    r.add_all(&[M::Pushf, M::Pushfd, M::Pushfq], G, pushf);
    r.add_all(&[M::Popf, M::Popfd, M::Popfq], G, popf);
    r.add_all(&[M::Clc, M::Stc, M::Cmc, M::Cld, M::Std], G, flag_op);
    // Port I/O.
    r.add(M::In, G, io::in_);
    r.add(M::Out, G, io::out);
    r.add(M::Enter, G, enter);
}

/// MOV to a segment, control, debug or test register.
pub fn mov_to_special(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let r = ins.op0_register();
    if r.is_segment_register() {
        segment::mov_to_seg(cpu, bus, ins)
    } else if r.is_cr() {
        control::mov_to_cr(cpu, bus, ins)
    } else if r.is_dr() {
        control::mov_to_dr(cpu, ins)
    } else {
        Err(Fault::ud())
    }
}

/// MOV from a segment, control, debug or test register.
pub fn mov_from_special(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let r = ins.op1_register();
    if r.is_segment_register() {
        let sel = cpu.state.seg(crate::operand::seg_of(r)).selector as u64;
        cpu.write_op(bus, ins, 0, sel)
    } else if r.is_cr() {
        control::mov_from_cr(cpu, ins)
    } else if r.is_dr() {
        control::mov_from_dr(cpu, ins)
    } else {
        Err(Fault::ud())
    }
}

/// POP into a segment register.
pub fn pop_segment(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    segment::pop_seg(cpu, bus, ins)
}

/// JMP far (direct ptr16:16/32 or indirect m16:16/32/64).
pub fn far_jmp(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    far::far_jmp(cpu, bus, ins)
}

/// CALL far.
pub fn far_call(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    far::far_call(cpu, bus, ins)
}

fn nop(_cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    Ok(())
}

/// Guest stores are host stores, so the host's store buffer may let a
/// later guest load pass an earlier guest store, as on real hardware:
/// MFENCE must stop that between vCPUs (LFENCE and SFENCE order nothing
/// that x86's TSO does not already order for ordinary memory).
fn mfence(_cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

fn undefined(_cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    Err(Fault::ud())
}

fn require_cpl0(cpu: &Cpu) -> ExecResult {
    if cpu.state.cpl() != 0 {
        return Err(Fault::gp0());
    }
    Ok(())
}

/// INVD, WBINVD: caches are coherent here; CPL 0 only.
fn privileged_nop(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    require_cpl0(cpu)
}

/// CLFLUSH m8: no cache to flush, but the address must be valid.
fn clflush(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if ins.op_kind(0) != OpKind::Memory {
        return Err(Fault::ud());
    }
    let ea = cpu.effective_address(ins);
    cpu.linear(cpu.mem_seg(ins), ea, 1, false)?;
    Ok(())
}

/// STAC/CLAC: set or clear RFLAGS.AC (only when SMAP is offered; CPL 0).
fn stac_clac(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if !cpu.config.features.smap {
        return Err(Fault::ud());
    }
    require_cpl0(cpu)?;
    if ins.mnemonic() == M::Stac {
        cpu.state.rflags |= flags::AC;
    } else {
        cpu.state.rflags &= !flags::AC;
    }
    Ok(())
}

/// Deliver a software interrupt with RIP already at the next instruction.
/// A fault during delivery is reported at the INT instruction itself.
fn software_interrupt(cpu: &mut Cpu, bus: &mut dyn Bus, vec: u8, kind: EventKind) -> ExecResult {
    let sp = cpu.state.gpr[reg::RSP];
    cpu.end_block = true;
    match cpu.try_deliver(bus, kind, vec, None) {
        Ok(()) => Ok(()),
        Err(f) => {
            cpu.state.gpr[reg::RSP] = sp;
            Err(f)
        }
    }
}

fn int_n(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    software_interrupt(cpu, bus, ins.immediate8(), EventKind::Software)
}

fn int3(cpu: &mut Cpu, bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    software_interrupt(cpu, bus, vector::BP, EventKind::Software)
}

fn into(cpu: &mut Cpu, bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    if cpu.state.rflags & flags::OF == 0 {
        return Ok(());
    }
    software_interrupt(cpu, bus, vector::OF, EventKind::Software)
}

/// INT1 (ICEBP): a #DB trap without the gate privilege check.
fn int1(cpu: &mut Cpu, bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    software_interrupt(cpu, bus, vector::DB, EventKind::Exception)
}

/// CPUID: EAX/ECX select the leaf; results are zero-extended.
fn cpuid(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    let leaf = cpu.state.gpr[reg::RAX] as u32;
    let sub = cpu.state.gpr[reg::RCX] as u32;
    let [a, b, c, d] = cpu.config.cpuid(leaf, sub);
    cpu.set_reg(Register::EAX, a as u64);
    cpu.set_reg(Register::EBX, b as u64);
    cpu.set_reg(Register::ECX, c as u64);
    cpu.set_reg(Register::EDX, d as u64);
    Ok(())
}

/// RDTSC is privileged when CR4.TSD is set.
fn tsc_allowed(cpu: &Cpu) -> ExecResult {
    if cpu.state.cr4 & cr::CR4_TSD != 0 && cpu.state.cpl() != 0 {
        return Err(Fault::gp0());
    }
    Ok(())
}

fn rdtsc(cpu: &mut Cpu, bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    tsc_allowed(cpu)?;
    let t = msr::read_tsc(cpu, bus);
    cpu.set_reg(Register::EAX, t & 0xffff_ffff);
    cpu.set_reg(Register::EDX, t >> 32);
    Ok(())
}

fn rdtscp(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if !cpu.config.features.rdtscp {
        return Err(Fault::ud());
    }
    rdtsc(cpu, bus, ins)?;
    cpu.set_reg(Register::ECX, cpu.state.msr.tsc_aux & 0xffff_ffff);
    Ok(())
}

/// RDPMC: no performance counters are offered.
fn rdpmc(_cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    Err(Fault::gp0())
}

/// HLT: wait for an interrupt (CPL 0 only).
fn hlt(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    require_cpl0(cpu)?;
    cpu.state.events.halted = true;
    cpu.end_block = true;
    Ok(())
}

/// Whether CLI/STI may change IF (no VME/PVI: otherwise #GP).
fn if_allowed(cpu: &Cpu) -> ExecResult {
    let s = &cpu.state;
    if !s.protected_mode() {
        return Ok(());
    }
    let iopl = ((s.rflags & flags::IOPL) >> 12) as u8;
    let limit = if s.rflags & flags::VM != 0 { 3 } else { s.cpl() };
    if limit > iopl {
        return Err(Fault::gp0());
    }
    Ok(())
}

fn cli(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    if_allowed(cpu)?;
    cpu.state.rflags &= !flags::IF;
    Ok(())
}

/// STI: interrupts stay blocked until after the next instruction when IF
/// was clear.
fn sti(cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    if_allowed(cpu)?;
    if cpu.state.rflags & flags::IF == 0 {
        cpu.state.rflags |= flags::IF;
        cpu.state.events.interrupt_shadow = true;
        cpu.end_block = true;
    }
    Ok(())
}

fn flags_size(ins: &Instruction) -> u32 {
    match ins.code() {
        Code::Pushfw | Code::Popfw => 2,
        Code::Pushfq | Code::Popfq => 8,
        _ => 4,
    }
}

/// PUSHF/PUSHFD/PUSHFQ: VM and RF read as 0 in the image.
fn pushf(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let s = &cpu.state;
    if s.rflags & flags::VM != 0 && s.rflags & flags::IOPL != flags::IOPL {
        return Err(Fault::gp0());
    }
    let v = s.rflags & !(flags::VM | flags::RF);
    cpu.push(bus, v, flags_size(ins))
}

/// POPF/POPFD/POPFQ with the CPL/IOPL rules: IOPL changes only at CPL 0,
/// IF only when CPL <= IOPL; VM, VIF and VIP never change; RF is cleared.
fn popf(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let s = &cpu.state;
    if s.rflags & flags::VM != 0 && s.rflags & flags::IOPL != flags::IOPL {
        return Err(Fault::gp0());
    }
    let size = flags_size(ins);
    let sp = cpu.sp();
    let v = cpu.read_sized(bus, Seg::Ss, sp, size)?;
    let old = cpu.state.rflags;
    let cpl = cpu.state.cpl();
    let iopl = ((old & flags::IOPL) >> 12) as u8;
    let mut mask = flags::STATUS | flags::TF | flags::DF | flags::NT | flags::AC | flags::ID;
    if cpl <= iopl {
        mask |= flags::IF;
    }
    if cpl == 0 {
        mask |= flags::IOPL;
    }
    if size == 2 {
        mask &= 0xffff;
    }
    let new = ((old & !mask) | (v & mask) | flags::FIXED1) & !flags::RF;
    cpu.set_sp(sp.wrapping_add(size as u64));
    cpu.state.rflags = new;
    if new & flags::IF != 0 && old & flags::IF == 0 {
        // Let the run loop deliver pending interrupts right away.
        cpu.end_block = true;
    }
    Ok(())
}

/// CLC, STC, CMC, CLD, STD.
fn flag_op(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let f = &mut cpu.state.rflags;
    match ins.mnemonic() {
        M::Clc => *f &= !flags::CF,
        M::Stc => *f |= flags::CF,
        M::Cmc => *f ^= flags::CF,
        M::Cld => *f &= !flags::DF,
        _ => *f |= flags::DF,
    }
    Ok(())
}

/// ENTER imm16, imm8: make a stack frame with `level` nesting levels.
fn enter(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let size = match ins.code() {
        Code::Enterw_imm16_imm8 => 2,
        Code::Enterq_imm16_imm8 => 8,
        _ => 4,
    };
    let alloc = ins.immediate16() as u64;
    let level = (ins.immediate8_2nd() % 32) as u64;
    let old_sp = cpu.state.gpr[reg::RSP];
    let old_bp = cpu.state.gpr[reg::RBP];
    let r = (|| -> ExecResult {
        let bp_mask = match cpu.state.stack_bits() {
            64 => u64::MAX,
            32 => 0xffff_ffff,
            _ => 0xffff,
        };
        cpu.push(bus, old_bp, size)?;
        let frame = cpu.sp();
        let mut bp = old_bp & bp_mask;
        if level > 0 {
            for _ in 1..level {
                bp = bp.wrapping_sub(size as u64) & bp_mask;
                let v = cpu.read_sized(bus, Seg::Ss, bp, size)?;
                cpu.push(bus, v, size)?;
            }
            cpu.push(bus, frame, size)?;
        }
        // The new stack top must be writable: touch it before committing.
        let new_sp = cpu.sp().wrapping_sub(alloc) & bp_mask;
        if alloc > 0 {
            cpu.linear(Seg::Ss, new_sp, 1, true)?;
        }
        let reg = match size {
            2 => Register::BP,
            4 => Register::EBP,
            _ => Register::RBP,
        };
        cpu.set_reg(reg, frame);
        let sp = cpu.sp();
        cpu.set_sp(sp.wrapping_sub(alloc));
        Ok(())
    })();
    if r.is_err() {
        cpu.state.gpr[reg::RSP] = old_sp;
        cpu.state.gpr[reg::RBP] = old_bp;
    }
    r
}
