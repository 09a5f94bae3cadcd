//! Segment registers and descriptor tables: loading selectors with the
//! protected-mode checks, MOV/POP to segment registers, LDS..LSS, the
//! descriptor-table registers (LGDT, LIDT, LLDT, LTR and their stores) and
//! the descriptor probes LAR, LSL, VERR, VERW.

use iced_x86::{Code, Instruction, OpKind};

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{vector, ExecResult, Fault};
use crate::operand::seg_of;
use crate::state::{flags, DescriptorTable, Seg, Segment};

/// Error code for a fault about `sel`: the selector without its RPL.
pub(super) fn sel_err(sel: u16) -> u32 {
    (sel & 0xfffc) as u32
}

/// A null selector loaded into a data segment register (or SS in 64-bit mode).
fn null_segment(sel: u16, dpl: u8) -> Segment {
    Segment {
        selector: sel,
        unusable: true,
        dpl,
        ..Default::default()
    }
}

/// Set the accessed bit of the descriptor `raw` for `sel` in memory, as the
/// processor does on every segment load.
fn set_accessed(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16, raw: u64) -> ExecResult {
    if raw & (1 << 40) != 0 {
        return Ok(());
    }
    let base = if sel & 4 != 0 {
        cpu.state.ldtr.base
    } else {
        cpu.state.gdtr.base
    };
    let addr = base.wrapping_add((sel & !7) as u64 + 5);
    cpu.write_system(bus, addr, &[((raw >> 40) as u8) | 1])
}

/// Real-mode (or "big real mode") load: only selector and base change.
fn real_mode_segment(cur: &Segment, sel: u16) -> Segment {
    Segment {
        selector: sel,
        base: (sel as u64) << 4,
        present: true,
        unusable: false,
        ..*cur
    }
}

/// Whether segment loads use descriptors (protected mode outside VM86).
fn descriptor_mode(cpu: &Cpu) -> bool {
    cpu.state.protected_mode() && cpu.state.rflags & flags::VM == 0
}

/// The stack segment for `sel` when the CPL becomes `cpl`. `target64`: the
/// code that will run is 64-bit, which allows a null SS below CPL 3.
pub(super) fn stack_segment(
    cpu: &mut Cpu,
    bus: &mut dyn Bus,
    sel: u16,
    cpl: u8,
    target64: bool,
) -> ExecResult<Segment> {
    let rpl = (sel & 3) as u8;
    if sel & !3 == 0 {
        if target64 && cpl < 3 && rpl == cpl {
            return Ok(null_segment(sel, cpl));
        }
        return Err(Fault::gp0());
    }
    let raw = cpu.read_descriptor(bus, sel)?;
    let mut d = Segment::from_descriptor(sel, raw);
    if rpl != cpl || !d.s || d.type_ & 0xa != 0x2 || d.dpl != cpl {
        return Err(Fault::gp(sel_err(sel)));
    }
    if !d.present {
        return Err(Fault::with_code(vector::SS, sel_err(sel)));
    }
    set_accessed(cpu, bus, sel, raw)?;
    d.type_ |= 1;
    Ok(d)
}

/// The segment that loading `sel` into `seg` (not CS) would produce, with
/// all checks of the current mode. Nothing is committed.
pub(crate) fn data_segment(cpu: &mut Cpu, bus: &mut dyn Bus, seg: Seg, sel: u16) -> ExecResult<Segment> {
    if !descriptor_mode(cpu) {
        return Ok(real_mode_segment(cpu.state.seg(seg), sel));
    }
    let cpl = cpu.state.cpl();
    if seg == Seg::Ss {
        let in64 = cpu.state.in_64bit();
        return stack_segment(cpu, bus, sel, cpl, in64);
    }
    if sel & !3 == 0 {
        return Ok(null_segment(sel, 0));
    }
    let rpl = (sel & 3) as u8;
    let raw = cpu.read_descriptor(bus, sel)?;
    let mut d = Segment::from_descriptor(sel, raw);
    // Data, or readable code.
    if !d.s || (d.type_ & 8 != 0 && d.type_ & 2 == 0) {
        return Err(Fault::gp(sel_err(sel)));
    }
    let conforming_code = d.type_ & 0xc == 0xc;
    if !conforming_code && (d.dpl < cpl || d.dpl < rpl) {
        return Err(Fault::gp(sel_err(sel)));
    }
    if !d.present {
        return Err(Fault::with_code(vector::NP, sel_err(sel)));
    }
    set_accessed(cpu, bus, sel, raw)?;
    d.type_ |= 1;
    Ok(d)
}

/// Load a data segment register (or SS) and commit it. MOV SS and POP SS
/// callers add the interrupt shadow.
pub(crate) fn load_data_segment(cpu: &mut Cpu, bus: &mut dyn Bus, seg: Seg, sel: u16) -> ExecResult {
    let d = data_segment(cpu, bus, seg, sel)?;
    *cpu.state.seg_mut(seg) = d;
    if seg == Seg::Ss {
        // The stack size may have changed; end the block so nothing cached
        // depends on it, and block interrupts for one instruction.
        cpu.state.events.interrupt_shadow = true;
        cpu.end_block = true;
    }
    Ok(())
}

/// The code segment a far JMP/CALL to `sel` would load (code segments only;
/// call gates, task gates and TSS selectors raise #GP). CPL is unchanged.
pub(super) fn code_segment_for_transfer(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16) -> ExecResult<Segment> {
    let cpl = cpu.state.cpl();
    if sel & !3 == 0 {
        return Err(Fault::gp0());
    }
    let raw = cpu.read_descriptor(bus, sel)?;
    let d = Segment::from_descriptor(sel, raw);
    let err = Fault::gp(sel_err(sel));
    if !d.is_code() {
        // System descriptors (call/task gates, TSS): Linux uses none of them.
        return Err(err);
    }
    let rpl = (sel & 3) as u8;
    if d.type_ & 4 != 0 {
        if d.dpl > cpl {
            return Err(err);
        }
    } else if rpl > cpl || d.dpl != cpl {
        return Err(err);
    }
    admit_code_segment(cpu, bus, sel, raw, d, cpl)
}

/// The code segment a far RET or IRET to `sel` would load; the new CPL is
/// the selector's RPL (never more privileged than the current CPL).
pub(super) fn code_segment_for_return(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16) -> ExecResult<Segment> {
    let cpl = cpu.state.cpl();
    if sel & !3 == 0 {
        return Err(Fault::gp0());
    }
    let raw = cpu.read_descriptor(bus, sel)?;
    let d = Segment::from_descriptor(sel, raw);
    let err = Fault::gp(sel_err(sel));
    let rpl = (sel & 3) as u8;
    if !d.is_code() || rpl < cpl {
        return Err(err);
    }
    if d.type_ & 4 != 0 {
        if d.dpl > rpl {
            return Err(err);
        }
    } else if d.dpl != rpl {
        return Err(err);
    }
    admit_code_segment(cpu, bus, sel, raw, d, rpl)
}

/// The checks and updates shared by far transfers and returns once the
/// privilege rules passed: present, a valid L/D combination, the accessed
/// bit, and the segment as loaded at `new_cpl`.
fn admit_code_segment(
    cpu: &mut Cpu,
    bus: &mut dyn Bus,
    sel: u16,
    raw: u64,
    mut d: Segment,
    new_cpl: u8,
) -> ExecResult<Segment> {
    if !d.present {
        return Err(Fault::with_code(vector::NP, sel_err(sel)));
    }
    if cpu.state.long_mode() && d.l && d.db {
        return Err(Fault::gp(sel_err(sel)));
    }
    set_accessed(cpu, bus, sel, raw)?;
    d.type_ |= 1;
    d.selector = (sel & !3) | new_cpl as u16;
    d.dpl = new_cpl;
    Ok(d)
}

/// After a return to an outer privilege level: data segment registers the
/// new CPL may not use become null.
pub(super) fn invalidate_data_segments(cpu: &mut Cpu) {
    let cpl = cpu.state.cpl();
    for seg in [Seg::Es, Seg::Ds, Seg::Fs, Seg::Gs] {
        let s = cpu.state.seg_mut(seg);
        if s.unusable || s.selector & !3 == 0 {
            continue;
        }
        let data_or_nonconforming = !s.is_code() || s.type_ & 4 == 0;
        if data_or_nonconforming && s.dpl < cpl {
            s.selector = 0;
            s.unusable = true;
        }
    }
}

/// MOV Sreg, r/m16.
pub(super) fn mov_to_seg(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let seg = seg_of(ins.op0_register());
    if seg == Seg::Cs {
        return Err(Fault::ud());
    }
    let sel = cpu.read_op(bus, ins, 1)? as u16;
    load_data_segment(cpu, bus, seg, sel)
}

/// POP ES/SS/DS/FS/GS.
pub(super) fn pop_seg(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    let seg = seg_of(ins.op0_register());
    if seg == Seg::Cs {
        return Err(Fault::ud());
    }
    let size = cpu.stack_op_size(ins);
    let sp = cpu.sp();
    let sel = cpu.read_sized(bus, Seg::Ss, sp, size)? as u16;
    // The new SS may change the stack size: update SP with the old one.
    let d = data_segment(cpu, bus, seg, sel)?;
    cpu.set_sp(sp.wrapping_add(size as u64));
    *cpu.state.seg_mut(seg) = d;
    if seg == Seg::Ss {
        cpu.state.events.interrupt_shadow = true;
        cpu.end_block = true;
    }
    Ok(())
}

/// LDS, LES, LFS, LGS, LSS: load a far pointer into Sreg:reg.
pub(super) fn load_far_pointer(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    use iced_x86::Mnemonic as M;
    let seg = match ins.mnemonic() {
        M::Lds => Seg::Ds,
        M::Les => Seg::Es,
        M::Lfs => Seg::Fs,
        M::Lgs => Seg::Gs,
        _ => Seg::Ss,
    };
    if ins.op_kind(1) != OpKind::Memory {
        return Err(Fault::ud());
    }
    let reg = ins.op0_register();
    let size = reg.size() as u32;
    let ea = cpu.effective_address(ins);
    let mseg = cpu.mem_seg(ins);
    let off = cpu.read_sized(bus, mseg, ea, size)?;
    let sel = cpu.read_u16(bus, mseg, ea.wrapping_add(size as u64) & addr_mask(cpu, ins))?;
    load_data_segment(cpu, bus, seg, sel)?;
    cpu.set_reg(reg, off);
    Ok(())
}

/// Mask for wrapping an offset to the instruction's address size.
pub(super) fn addr_mask(cpu: &Cpu, ins: &Instruction) -> u64 {
    match cpu.address_bits(ins) {
        64 => u64::MAX,
        32 => 0xffff_ffff,
        _ => 0xffff,
    }
}

fn require_cpl0(cpu: &Cpu) -> ExecResult {
    if cpu.state.cpl() != 0 {
        return Err(Fault::gp0());
    }
    Ok(())
}

/// LGDT and LIDT.
pub(super) fn load_table(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    require_cpl0(cpu)?;
    if ins.op_kind(0) != OpKind::Memory {
        return Err(Fault::ud());
    }
    let ea = cpu.effective_address(ins);
    let seg = cpu.mem_seg(ins);
    let limit = cpu.read_u16(bus, seg, ea)?;
    let base_off = ea.wrapping_add(2) & addr_mask(cpu, ins);
    let base = if cpu.state.in_64bit() {
        cpu.read_u64(bus, seg, base_off)?
    } else {
        let b = cpu.read_u32(bus, seg, base_off)? as u64;
        if matches!(ins.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16) {
            b & 0x00ff_ffff
        } else {
            b
        }
    };
    let t = DescriptorTable { base, limit };
    if ins.mnemonic() == iced_x86::Mnemonic::Lgdt {
        cpu.state.gdtr = t;
    } else {
        cpu.state.idtr = t;
    }
    Ok(())
}

/// SGDT and SIDT (allowed at any CPL: UMIP is not offered).
pub(super) fn store_table(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    if ins.op_kind(0) != OpKind::Memory {
        return Err(Fault::ud());
    }
    let t = if ins.mnemonic() == iced_x86::Mnemonic::Sgdt {
        cpu.state.gdtr
    } else {
        cpu.state.idtr
    };
    let ea = cpu.effective_address(ins);
    let seg = cpu.mem_seg(ins);
    let mut buf = [0u8; 10];
    buf[..2].copy_from_slice(&t.limit.to_le_bytes());
    buf[2..].copy_from_slice(&t.base.to_le_bytes());
    // Outside 64-bit mode only the low 32 bits of the base are stored.
    let len = if cpu.state.in_64bit() { 10 } else { 6 };
    // Check the whole destination before writing any of it.
    cpu.linear(seg, ea, len as u64, true)?;
    cpu.write_bytes(bus, seg, ea, &buf[..len])
}

/// Protected-mode-only instructions raise #UD in real and VM86 mode.
fn require_protected(cpu: &Cpu) -> ExecResult {
    if !descriptor_mode(cpu) {
        return Err(Fault::ud());
    }
    Ok(())
}

/// Base and limit of a system descriptor (LDT or TSS), 16 bytes in long mode.
fn system_segment(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16) -> ExecResult<(Segment, u64)> {
    let (lo, hi) = if cpu.state.long_mode() {
        cpu.read_descriptor_wide(bus, sel)?
    } else {
        (cpu.read_descriptor(bus, sel)?, 0)
    };
    let mut d = Segment::from_descriptor(sel, lo);
    if cpu.state.long_mode() {
        if (hi >> 40) & 0x1f != 0 {
            return Err(Fault::gp(sel_err(sel)));
        }
        d.base |= (hi & 0xffff_ffff) << 32;
    }
    Ok((d, lo))
}

/// LLDT r/m16.
pub(super) fn lldt(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    require_protected(cpu)?;
    require_cpl0(cpu)?;
    let sel = cpu.read_op(bus, ins, 0)? as u16;
    if sel & !3 == 0 {
        cpu.state.ldtr = Segment {
            selector: sel,
            unusable: true,
            ..Default::default()
        };
        return Ok(());
    }
    if sel & 4 != 0 {
        return Err(Fault::gp(sel_err(sel)));
    }
    let (d, _) = system_segment(cpu, bus, sel)?;
    if d.s || d.type_ != 2 {
        return Err(Fault::gp(sel_err(sel)));
    }
    if !d.present {
        return Err(Fault::with_code(vector::NP, sel_err(sel)));
    }
    cpu.state.ldtr = d;
    Ok(())
}

/// LTR r/m16: load the task register and mark the TSS busy.
pub(super) fn ltr(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    require_protected(cpu)?;
    require_cpl0(cpu)?;
    let sel = cpu.read_op(bus, ins, 0)? as u16;
    if sel & !3 == 0 {
        return Err(Fault::gp0());
    }
    if sel & 4 != 0 {
        return Err(Fault::gp(sel_err(sel)));
    }
    let (mut d, lo) = system_segment(cpu, bus, sel)?;
    // Available 32/64-bit TSS (type 9); a 16-bit TSS (type 1) outside long mode.
    let ok = !d.s && (d.type_ == 9 || (d.type_ == 1 && !cpu.state.long_mode()));
    if !ok {
        return Err(Fault::gp(sel_err(sel)));
    }
    if !d.present {
        return Err(Fault::with_code(vector::NP, sel_err(sel)));
    }
    let addr = cpu.state.gdtr.base.wrapping_add((sel & !7) as u64 + 5);
    cpu.write_system(bus, addr, &[((lo >> 40) as u8) | 2])?;
    d.type_ |= 2;
    cpu.state.tr = d;
    Ok(())
}

/// SLDT and STR: store a selector (zero-extended into a register).
pub(super) fn store_selector(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    require_protected(cpu)?;
    let sel = if ins.mnemonic() == iced_x86::Mnemonic::Sldt {
        cpu.state.ldtr.selector
    } else {
        cpu.state.tr.selector
    };
    cpu.write_op(bus, ins, 0, sel as u64)
}

/// What a LAR/LSL/VERR/VERW probe of `sel` finds: the raw descriptor if it
/// is visible at the current CPL and RPL.
fn probe(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16) -> ExecResult<Option<u64>> {
    if sel & !3 == 0 {
        return Ok(None);
    }
    let raw = match cpu.read_descriptor(bus, sel) {
        Ok(r) => r,
        // Outside the table: ZF=0, not a fault. Paging faults still fault.
        Err(f) if f.vector == vector::GP => return Ok(None),
        Err(f) => return Err(f),
    };
    let d = Segment::from_descriptor(sel, raw);
    let cpl = cpu.state.cpl();
    let rpl = (sel & 3) as u8;
    let conforming_code = d.s && d.type_ & 0xc == 0xc;
    if !conforming_code && (d.dpl < cpl || d.dpl < rpl) {
        return Ok(None);
    }
    Ok(Some(raw))
}

fn set_zf(cpu: &mut Cpu, on: bool) {
    if on {
        cpu.state.rflags |= flags::ZF;
    } else {
        cpu.state.rflags &= !flags::ZF;
    }
}

/// System descriptor types LAR (`lar`) or LSL accept in the current mode.
fn system_type_ok(long: bool, type_: u8, lar: bool) -> bool {
    if long {
        matches!(type_, 2 | 9 | 0xb) || (lar && type_ == 0xc)
    } else {
        matches!(type_, 1 | 2 | 3 | 9 | 0xb) || (lar && matches!(type_, 4 | 5 | 0xc))
    }
}

/// LAR and LSL.
pub(super) fn lar_lsl(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    require_protected(cpu)?;
    let sel = cpu.read_op(bus, ins, 1)? as u16;
    let lar = ins.mnemonic() == iced_x86::Mnemonic::Lar;
    let found = probe(cpu, bus, sel)?;
    let valid = found.filter(|&raw| {
        let d = Segment::from_descriptor(sel, raw);
        d.s || system_type_ok(cpu.state.long_mode(), d.type_, lar)
    });
    let Some(raw) = valid else {
        set_zf(cpu, false);
        return Ok(());
    };
    let dst = ins.op0_register();
    let v = if lar {
        let ar = (raw >> 32) & 0x00f0_ff00;
        if dst.size() == 2 {
            ar & 0xff00
        } else {
            ar
        }
    } else {
        Segment::from_descriptor(sel, raw).limit as u64
    };
    cpu.set_reg(dst, v);
    set_zf(cpu, true);
    Ok(())
}

/// VERR and VERW.
pub(super) fn verr_verw(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    require_protected(cpu)?;
    let sel = cpu.read_op(bus, ins, 0)? as u16;
    let write = ins.mnemonic() == iced_x86::Mnemonic::Verw;
    let ok = probe(cpu, bus, sel)?.is_some_and(|raw| {
        let d = Segment::from_descriptor(sel, raw);
        if !d.s {
            return false;
        }
        if write {
            !d.is_code() && d.type_ & 2 != 0
        } else {
            !d.is_code() || d.type_ & 2 != 0
        }
    });
    set_zf(cpu, ok);
    Ok(())
}
