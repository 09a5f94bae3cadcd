//! MMX, SSE, SSE2, SSE3 and SSSE3: the vector register file, data moves
//! and MXCSR. Integer lane operations live in `int.rs`, floating point in
//! `float.rs`.

mod float;
#[cfg(target_arch = "x86_64")]
mod host;
mod int;

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::Registry;
use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{vector, ExecResult, Fault};
use crate::state::cr;

pub(crate) const G: &str = "sse";

pub fn register(r: &mut Registry) {
    r.add_all(
        &[
            M::Movaps,
            M::Movapd,
            M::Movdqa,
            M::Movups,
            M::Movupd,
            M::Movdqu,
            M::Lddqu,
        ],
        G,
        mov_full,
    );
    r.add_all(&[M::Movntps, M::Movntpd, M::Movntdq, M::Movntq], G, mov_full);
    r.add(M::Movnti, G, movnti);
    r.add_all(&[M::Movd, M::Movq], G, movd_movq);
    r.add(M::Movq2dq, G, movq2dq);
    r.add(M::Movdq2q, G, movdq2q);
    r.add(M::Movss, G, movss);
    r.add(M::Movsd, G, movsd);
    r.add_all(&[M::Movlps, M::Movlpd], G, movlp);
    r.add_all(&[M::Movhps, M::Movhpd], G, movhp);
    r.add(M::Movhlps, G, movhlps);
    r.add(M::Movlhps, G, movlhps);
    r.add(M::Movddup, G, movddup);
    r.add(M::Movsldup, G, movsldup);
    r.add(M::Movshdup, G, movshdup);
    r.add(M::Maskmovdqu, G, maskmov);
    r.add(M::Maskmovq, G, maskmov);
    r.add(M::Ldmxcsr, G, ldmxcsr);
    r.add(M::Stmxcsr, G, stmxcsr);
    int::register(r);
    float::register(r);
}

/// MXCSR bits.
pub(crate) mod mx {
    pub const IE: u32 = 1 << 0;
    pub const DE: u32 = 1 << 1;
    pub const ZE: u32 = 1 << 2;
    pub const OE: u32 = 1 << 3;
    pub const UE: u32 = 1 << 4;
    pub const PE: u32 = 1 << 5;
    pub const DAZ: u32 = 1 << 6;
    pub const FLAGS: u32 = 0x3f;
    pub const MASK_SHIFT: u32 = 7;
    pub const RC_SHIFT: u32 = 13;
    pub const FTZ: u32 = 1 << 15;
    /// Bits LDMXCSR accepts (MXCSR_MASK in the FXSAVE image).
    pub const WRITABLE: u32 = 0xffff;
}

/// Checks for an SSE instruction: #UD without OS support or with
/// emulation on, #NM while the FPU context belongs to someone else.
#[inline(always)]
pub(crate) fn check_sse(cpu: &Cpu) -> ExecResult {
    let s = &cpu.state;
    if s.cr0 & cr::CR0_EM != 0 || s.cr4 & cr::CR4_OSFXSR == 0 {
        return Err(Fault::ud());
    }
    if s.cr0 & cr::CR0_TS != 0 {
        return Err(Fault::nm());
    }
    Ok(())
}

/// Checks for an instruction on MMX registers, which also reports a
/// pending x87 exception (#MF).
#[inline(always)]
pub(crate) fn check_mmx(cpu: &Cpu) -> ExecResult {
    let s = &cpu.state;
    if s.cr0 & cr::CR0_EM != 0 {
        return Err(Fault::ud());
    }
    if s.cr0 & cr::CR0_TS != 0 {
        return Err(Fault::nm());
    }
    if s.fpu.fsw & 0x80 != 0 {
        return Err(Fault::new(vector::MF));
    }
    Ok(())
}

/// Whether any operand is an MMX register.
#[inline(always)]
pub(crate) fn uses_mmx(ins: &Instruction) -> bool {
    (0..ins.op_count()).any(|n| ins.op_kind(n) == OpKind::Register && ins.op_register(n).is_mm())
}

/// The checks for `ins`, plus the x87-to-MMX transition (TOP = 0, all
/// registers valid) when it names an MMX register.
#[inline(always)]
pub(crate) fn enter(cpu: &mut Cpu, ins: &Instruction) -> ExecResult<bool> {
    if uses_mmx(ins) {
        check_mmx(cpu)?;
        Ok(true)
    } else {
        check_sse(cpu)?;
        Ok(false)
    }
}

/// Switch the x87 unit into MMX mode (after all faults are checked).
#[inline(always)]
pub(crate) fn mmx_transition(cpu: &mut Cpu) {
    cpu.state.fpu.fsw &= !(7 << 11);
    cpu.state.fpu.ftw = 0;
}

#[inline(always)]
pub(crate) fn get_mm(cpu: &Cpu, i: usize) -> u64 {
    let r = &cpu.state.fpu.regs[i & 7];
    u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]])
}

#[inline(always)]
pub(crate) fn set_mm(cpu: &mut Cpu, i: usize, v: u64) {
    let r = &mut cpu.state.fpu.regs[i & 7];
    r[..8].copy_from_slice(&v.to_le_bytes());
    r[8] = 0xff;
    r[9] = 0xff;
}

/// Memory operands that may be misaligned although they are 16 bytes.
pub(crate) fn unaligned_ok(m: M) -> bool {
    matches!(m, M::Movups | M::Movupd | M::Movdqu | M::Lddqu)
}

/// Segment and offset of the memory operand, with the 16-byte alignment
/// check of legacy SSE (#GP(0)) where the instruction requires it.
#[inline(always)]
pub(crate) fn mem_addr(cpu: &Cpu, ins: &Instruction, write: bool) -> ExecResult<(crate::state::Seg, u64)> {
    let seg = cpu.mem_seg(ins);
    let ea = cpu.effective_address(ins);
    if ins.memory_size().size() == 16 && !unaligned_ok(ins.mnemonic()) {
        let lin = cpu.linear(seg, ea, 16, write)?;
        if lin & 15 != 0 {
            return Err(Fault::gp0());
        }
    }
    Ok((seg, ea))
}

/// Read operand `n` zero-extended to 128 bits: XMM, MMX, general
/// register, memory (by its size) or immediate.
#[inline(always)]
pub(crate) fn load(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, n: u32) -> ExecResult<u128> {
    match ins.op_kind(n) {
        OpKind::Register => {
            let r = ins.op_register(n);
            Ok(if r.is_xmm() {
                cpu.state.fpu.xmm[r.number() & 15]
            } else if r.is_mm() {
                get_mm(cpu, r.number()) as u128
            } else {
                cpu.get_reg(r) as u128
            })
        }
        OpKind::Memory => {
            let (seg, ea) = mem_addr(cpu, ins, false)?;
            Ok(match ins.memory_size().size() {
                16 => cpu.read_u128(bus, seg, ea)?,
                8 => cpu.read_u64(bus, seg, ea)? as u128,
                4 => cpu.read_u32(bus, seg, ea)? as u128,
                2 => cpu.read_u16(bus, seg, ea)? as u128,
                1 => cpu.read_u8(bus, seg, ea)? as u128,
                _ => return Err(Fault::ud()),
            })
        }
        _ => Ok(cpu.read_op(bus, ins, n)? as u128),
    }
}

/// Write operand `n`: a whole XMM register, an MMX register, a general
/// register (x86 width rules) or memory of the operand's size.
#[inline(always)]
pub(crate) fn store(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, n: u32, v: u128) -> ExecResult {
    match ins.op_kind(n) {
        OpKind::Register => {
            let r = ins.op_register(n);
            if r.is_xmm() {
                cpu.state.fpu.xmm[r.number() & 15] = v;
            } else if r.is_mm() {
                set_mm(cpu, r.number(), v as u64);
            } else {
                cpu.set_reg(r, v as u64);
            }
            Ok(())
        }
        OpKind::Memory => {
            let (seg, ea) = mem_addr(cpu, ins, true)?;
            match ins.memory_size().size() {
                16 => cpu.write_u128(bus, seg, ea, v),
                8 => cpu.write_u64(bus, seg, ea, v as u64),
                4 => cpu.write_u32(bus, seg, ea, v as u32),
                2 => cpu.write_u16(bus, seg, ea, v as u16),
                _ => Err(Fault::ud()),
            }
        }
        _ => Err(Fault::ud()),
    }
}

/// Index of XMM operand `n` (which must be a register).
#[inline(always)]
pub(crate) fn xmm_of(ins: &Instruction, n: u32) -> usize {
    ins.op_register(n).number() & 15
}

/// Whole-register moves (aligned, unaligned, non-temporal).
fn mov_full(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let mmx = enter(cpu, ins)?;
    let v = load(cpu, bus, ins, 1)?;
    store(cpu, bus, ins, 0, v)?;
    if mmx {
        mmx_transition(cpu);
    }
    Ok(())
}

fn movnti(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let v = cpu.read_op(bus, ins, 1)?;
    cpu.write_op(bus, ins, 0, v)
}

/// MOVD/MOVQ between XMM, MMX, general registers and memory; a write to
/// an XMM register zeroes the rest of it.
fn movd_movq(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let mmx = enter(cpu, ins)?;
    let bytes = if ins.mnemonic() == M::Movd { 4 } else { 8 };
    let mask = if bytes == 4 { 0xffff_ffffu128 } else { u64::MAX as u128 };
    let v = load(cpu, bus, ins, 1)? & mask;
    store(cpu, bus, ins, 0, v)?;
    if mmx {
        mmx_transition(cpu);
    }
    Ok(())
}

fn movq2dq(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_mmx(cpu)?;
    check_sse(cpu)?;
    let v = get_mm(cpu, ins.op1_register().number());
    cpu.state.fpu.xmm[xmm_of(ins, 0)] = v as u128;
    mmx_transition(cpu);
    Ok(())
}

fn movdq2q(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_mmx(cpu)?;
    check_sse(cpu)?;
    let v = cpu.state.fpu.xmm[xmm_of(ins, 1)] as u64;
    set_mm(cpu, ins.op0_register().number(), v);
    mmx_transition(cpu);
    Ok(())
}

/// Scalar move of the low `bits`: register to register merges, a load
/// zeroes the rest, a store writes only the low element.
fn mov_scalar(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, mask: u128) -> ExecResult {
    check_sse(cpu)?;
    let v = load(cpu, bus, ins, 1)?;
    if ins.op_kind(0) == OpKind::Register {
        let d = xmm_of(ins, 0);
        let x = &mut cpu.state.fpu.xmm[d];
        *x = if ins.op_kind(1) == OpKind::Register {
            (*x & !mask) | (v & mask)
        } else {
            v & mask
        };
        Ok(())
    } else {
        store(cpu, bus, ins, 0, v & mask)
    }
}

fn movss(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    mov_scalar(cpu, bus, ins, 0xffff_ffff)
}

/// MOVSD: the SSE2 scalar move; the string move shares the mnemonic.
pub fn movsd(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if !is_sse_form(ins) {
        // The string MOVSD belongs to the string instructions' file.
        return Err(cpu.unimplemented(ins.mnemonic()));
    }
    mov_scalar(cpu, bus, ins, u64::MAX as u128)
}

/// Whether an instruction whose mnemonic is shared with a string
/// instruction (MOVSD, CMPSD) is the SSE form.
#[inline(always)]
pub fn is_sse_form(ins: &Instruction) -> bool {
    ins.op_kind(0) == OpKind::Register && ins.op0_register().is_xmm()
        || ins.op_kind(1) == OpKind::Register && ins.op1_register().is_xmm()
}

const LO: u128 = u64::MAX as u128;

/// MOVLPS/MOVLPD: the low quadword from or to memory.
fn movlp(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_sse(cpu)?;
    if ins.op_kind(0) == OpKind::Memory {
        let v = cpu.state.fpu.xmm[xmm_of(ins, 1)] & LO;
        return store(cpu, bus, ins, 0, v);
    }
    let v = load(cpu, bus, ins, 1)?;
    let x = &mut cpu.state.fpu.xmm[xmm_of(ins, 0)];
    *x = (*x & !LO) | (v & LO);
    Ok(())
}

/// MOVHPS/MOVHPD: the high quadword from or to memory.
fn movhp(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_sse(cpu)?;
    if ins.op_kind(0) == OpKind::Memory {
        let v = cpu.state.fpu.xmm[xmm_of(ins, 1)] >> 64;
        return store(cpu, bus, ins, 0, v);
    }
    let v = load(cpu, bus, ins, 1)?;
    let x = &mut cpu.state.fpu.xmm[xmm_of(ins, 0)];
    *x = (*x & LO) | (v << 64);
    Ok(())
}

fn movhlps(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_sse(cpu)?;
    let v = cpu.state.fpu.xmm[xmm_of(ins, 1)] >> 64;
    let x = &mut cpu.state.fpu.xmm[xmm_of(ins, 0)];
    *x = (*x & !LO) | v;
    Ok(())
}

fn movlhps(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_sse(cpu)?;
    let v = cpu.state.fpu.xmm[xmm_of(ins, 1)] & LO;
    let x = &mut cpu.state.fpu.xmm[xmm_of(ins, 0)];
    *x = (*x & LO) | (v << 64);
    Ok(())
}

fn movddup(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_sse(cpu)?;
    let v = load(cpu, bus, ins, 1)? & LO;
    cpu.state.fpu.xmm[xmm_of(ins, 0)] = v | (v << 64);
    Ok(())
}

/// Duplicate the even (`odd` = 0) or odd dwords.
fn dup_dwords(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, odd: u32) -> ExecResult {
    check_sse(cpu)?;
    let v = load(cpu, bus, ins, 1)?;
    let d = |i: u32| (v >> (32 * (2 * i + odd))) as u32 as u128;
    cpu.state.fpu.xmm[xmm_of(ins, 0)] = d(0) | (d(0) << 32) | (d(1) << 64) | (d(1) << 96);
    Ok(())
}

fn movsldup(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    dup_dwords(cpu, bus, ins, 0)
}

fn movshdup(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    dup_dwords(cpu, bus, ins, 1)
}

/// MASKMOVQ/MASKMOVDQU: store the bytes whose mask byte has its top bit
/// set to DS:rDI. All of the destination must be accessible.
fn maskmov(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let mmx = enter(cpu, ins)?;
    // iced lists the implicit [rDI] destination as operand 0.
    let (src_n, mask_n) = (ins.op_count() - 2, ins.op_count() - 1);
    let data = load(cpu, bus, ins, src_n)?;
    let mask = load(cpu, bus, ins, mask_n)?;
    let n: usize = if mmx { 8 } else { 16 };
    let seg = cpu.mem_seg(ins);
    let di = match cpu.address_bits(ins) {
        64 => cpu.state.gpr[7],
        32 => cpu.state.gpr[7] & 0xffff_ffff,
        _ => cpu.state.gpr[7] & 0xffff,
    };
    let (d, m) = (data.to_le_bytes(), mask.to_le_bytes());
    if m[..n].iter().any(|b| b & 0x80 != 0) {
        // Read and write back the whole area so nothing changes when any
        // byte faults; then merge.
        let mut buf = [0u8; 16];
        for (i, b) in buf.iter_mut().enumerate().take(n) {
            *b = cpu.read_u8(bus, seg, di.wrapping_add(i as u64))?;
        }
        for i in 0..n {
            if m[i] & 0x80 != 0 {
                buf[i] = d[i];
            }
        }
        let lin = cpu.linear(seg, di, n as u64, true)?;
        let user = cpu.state.cpl() == 3;
        cpu.write_linear(bus, lin, &buf[..n], user)?;
    }
    if mmx {
        mmx_transition(cpu);
    }
    Ok(())
}

fn ldmxcsr(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_sse(cpu)?;
    let v = cpu.read_op(bus, ins, 0)? as u32;
    if v & !mx::WRITABLE != 0 {
        return Err(Fault::gp0());
    }
    cpu.state.fpu.mxcsr = v;
    Ok(())
}

fn stmxcsr(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    check_sse(cpu)?;
    let v = cpu.state.fpu.mxcsr as u64;
    cpu.write_op(bus, ins, 0, v)
}

/// Raise the SIMD floating-point exception for unmasked `flags`
/// (already merged into MXCSR): #XM with CR4.OSXMMEXCPT, else #UD.
pub(crate) fn simd_fault(cpu: &Cpu) -> Fault {
    if cpu.state.cr4 & cr::CR4_OSXMMEXCPT != 0 {
        Fault::new(vector::XM)
    } else {
        Fault::ud()
    }
}
