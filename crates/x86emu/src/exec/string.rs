//! String instructions: MOVS, STOS, LODS, CMPS, SCAS, INS and OUTS with
//! REP/REPE/REPNE, in 16-, 32- and 64-bit address sizes.
//!
//! A REP instruction runs a bounded amount of work per call and, when the
//! count is not exhausted, leaves RIP at itself and ends the block, so the
//! run loop takes events and then executes it again. RCX/RSI/RDI are
//! committed after every element (or fast chunk), so a fault leaves them
//! precise. REP MOVS and REP STOS with DF=0 copy or fill whole in-page
//! chunks of RAM through host pointers.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::flags::{set_status, sign_bit, szp};
use super::Registry;
use crate::bus::{Bus, PAGE_SIZE};
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::operand::{seg_of, size_mask};
use crate::state::{cr, flags, reg, Seg};

pub fn register(r: &mut Registry) {
    const G: &str = "string";
    // MOVSD and CMPSD share their mnemonics with SSE2; their string forms
    // are routed here by `exec::handler_for_instruction`.
    r.add_all(&[M::Movsb, M::Movsw, M::Movsq], G, movs);
    r.add_all(&[M::Cmpsb, M::Cmpsw, M::Cmpsq], G, cmps);
    r.add_all(&[M::Stosb, M::Stosw, M::Stosd, M::Stosq], G, stos);
    r.add_all(&[M::Lodsb, M::Lodsw, M::Lodsd, M::Lodsq], G, lods);
    r.add_all(&[M::Scasb, M::Scasw, M::Scasd, M::Scasq], G, scas);
    r.add_all(&[M::Insb, M::Insw, M::Insd], G, ins);
    r.add_all(&[M::Outsb, M::Outsw, M::Outsd], G, outs);
}

/// Work allowed per call of a REP instruction, in elements; a fast chunk
/// costs one unit per `FAST_BYTES_PER_UNIT` bytes.
const REP_BUDGET: u64 = 4096;
const FAST_BYTES_PER_UNIT: u64 = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
    Ins,
    Outs,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rep {
    None,
    /// REP: run until the count is exhausted.
    Count,
    /// REPE/REPZ on CMPS/SCAS: also stop when ZF=0.
    WhileEqual,
    /// REPNE/REPNZ on CMPS/SCAS: also stop when ZF=1.
    WhileNotEqual,
}

/// One decoded string operation.
struct Op {
    kind: Kind,
    /// Element size in bytes.
    size: u32,
    /// Address size in bytes (2, 4 or 8): width of RSI/RDI/RCX.
    addr_size: u32,
    /// Source segment (DS unless overridden); the destination is always ES.
    src_seg: Seg,
    rep: Rep,
}

impl Op {
    fn decode(cpu: &Cpu, ins: &Instruction, kind: Kind) -> Op {
        let mut addr_size = 0;
        for n in 0..ins.op_count() {
            addr_size = match ins.op_kind(n) {
                OpKind::MemorySegSI | OpKind::MemoryESDI => 2,
                OpKind::MemorySegESI | OpKind::MemoryESEDI => 4,
                OpKind::MemorySegRSI | OpKind::MemoryESRDI => 8,
                _ => continue,
            };
            break;
        }
        if addr_size == 0 {
            addr_size = cpu.address_bits(ins) / 8;
        }
        let size = match ins.memory_size().size() {
            s @ (1 | 2 | 4 | 8) => s as u32,
            _ => element_size(ins.mnemonic()),
        };
        let compares = matches!(kind, Kind::Cmps | Kind::Scas);
        let rep = if ins.has_repe_prefix() {
            if compares {
                Rep::WhileEqual
            } else {
                Rep::Count
            }
        } else if ins.has_repne_prefix() {
            if compares {
                Rep::WhileNotEqual
            } else {
                Rep::Count
            }
        } else {
            Rep::None
        };
        Op {
            kind,
            size,
            addr_size,
            src_seg: seg_of(ins.memory_segment()),
            rep,
        }
    }
}

/// Element size from the mnemonic's suffix (fallback when iced reports no
/// memory size).
fn element_size(m: M) -> u32 {
    match m {
        M::Movsb | M::Cmpsb | M::Stosb | M::Lodsb | M::Scasb | M::Insb | M::Outsb => 1,
        M::Movsw | M::Cmpsw | M::Stosw | M::Lodsw | M::Scasw | M::Insw | M::Outsw => 2,
        M::Movsq | M::Cmpsq | M::Stosq | M::Lodsq | M::Scasq => 8,
        _ => 4,
    }
}

pub fn movs(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    execute(cpu, bus, ins, Kind::Movs)
}

pub fn cmps(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    execute(cpu, bus, ins, Kind::Cmps)
}

fn stos(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    execute(cpu, bus, ins, Kind::Stos)
}

fn lods(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    execute(cpu, bus, ins, Kind::Lods)
}

fn scas(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    execute(cpu, bus, ins, Kind::Scas)
}

fn ins(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    execute(cpu, bus, ins, Kind::Ins)
}

fn outs(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    execute(cpu, bus, ins, Kind::Outs)
}

/// Whether port I/O of `size` bytes at `port` is allowed: always in real
/// mode and at CPL <= IOPL; otherwise (and always in virtual-8086 mode) the
/// TSS I/O permission bitmap decides, and a denied access is #GP(0).
pub fn io_permitted(cpu: &mut Cpu, bus: &mut dyn Bus, port: u16, size: u32) -> ExecResult {
    let s = &cpu.state;
    if !s.protected_mode() {
        return Ok(());
    }
    let iopl = ((s.rflags & flags::IOPL) >> 12) as u8;
    let vm86 = s.rflags & flags::VM != 0;
    if !vm86 && s.cpl() <= iopl {
        return Ok(());
    }
    let tr = s.tr;
    let long_mode = s.long_mode();
    // Only a 32/64-bit TSS (available or busy) has a bitmap.
    if !tr.present || (tr.type_ != 9 && tr.type_ != 11) || tr.limit < 0x67 {
        return Err(Fault::gp0());
    }
    let wrap = |lin: u64| if long_mode { lin } else { lin & 0xffff_ffff };
    let mut base = [0u8; 2];
    cpu.read_system(bus, wrap(tr.base.wrapping_add(0x66)), &mut base)?;
    // The CPU reads the two bitmap bytes covering the port; both must lie
    // inside the TSS limit.
    let byte = u16::from_le_bytes(base) as u64 + (port as u64 >> 3);
    if byte + 1 > tr.limit as u64 {
        return Err(Fault::gp0());
    }
    let mut bits = [0u8; 2];
    cpu.read_system(bus, wrap(tr.base.wrapping_add(byte)), &mut bits)?;
    let wanted = ((1u32 << size) - 1) << (port & 7);
    if u16::from_le_bytes(bits) as u32 & wanted != 0 {
        return Err(Fault::gp0());
    }
    Ok(())
}

/// Flags of `a - b` on `size`-byte values, as CMP computes them.
fn sub_flags(a: u64, b: u64, size: u32) -> u64 {
    let mask = size_mask(size);
    let (a, b) = (a & mask, b & mask);
    let r = a.wrapping_sub(b) & mask;
    let mut f = szp(r, size);
    if a < b {
        f |= flags::CF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= flags::AF;
    }
    if (a ^ b) & (a ^ r) & sign_bit(size) != 0 {
        f |= flags::OF;
    }
    f
}

/// Read an address-size register (RSI, RDI, RCX) wrapped to the address size.
#[inline(always)]
fn addr_reg(cpu: &Cpu, op: &Op, r: usize) -> u64 {
    cpu.state.gpr[r] & size_mask(op.addr_size)
}

/// Write an address-size register: 64-bit replaces, 32-bit zero-extends,
/// 16-bit keeps the upper bits.
#[inline(always)]
fn set_addr_reg(cpu: &mut Cpu, op: &Op, r: usize, v: u64) {
    let g = &mut cpu.state.gpr[r];
    *g = match op.addr_size {
        8 => v,
        4 => v & 0xffff_ffff,
        _ => (*g & !0xffff) | (v & 0xffff),
    };
}

/// Move RSI or RDI by `n` elements in the direction DF says.
#[inline(always)]
fn advance(cpu: &mut Cpu, op: &Op, r: usize, n: u64) {
    let bytes = n.wrapping_mul(op.size as u64);
    let delta = if cpu.state.rflags & flags::DF != 0 {
        bytes.wrapping_neg()
    } else {
        bytes
    };
    let v = cpu.state.gpr[r].wrapping_add(delta);
    set_addr_reg(cpu, op, r, v);
}

fn execute(cpu: &mut Cpu, bus: &mut dyn Bus, ins: &Instruction, kind: Kind) -> ExecResult {
    let op = Op::decode(cpu, ins, kind);
    if matches!(kind, Kind::Ins | Kind::Outs) {
        // Permission is checked before the count, as QEMU does.
        let port = cpu.state.gpr[reg::RDX] as u16;
        io_permitted(cpu, bus, port, op.size)?;
    }
    if op.rep == Rep::None {
        element(cpu, bus, &op)?;
        return Ok(());
    }
    let mut count = addr_reg(cpu, &op, reg::RCX);
    // Single-stepping traps after every iteration.
    let budget = if cpu.state.rflags & flags::TF != 0 {
        1
    } else {
        REP_BUDGET
    };
    let mut spent = 0;
    while count != 0 {
        if spent >= budget {
            // Resume here after the run loop has looked at events.
            cpu.state.rip = cpu.cur_ip;
            cpu.end_block = true;
            return Ok(());
        }
        if budget > 1 {
            let done = fast_chunk(cpu, bus, &op, count)?;
            if done != 0 {
                count -= done;
                set_addr_reg(cpu, &op, reg::RCX, count);
                spent += (done * op.size as u64).div_ceil(FAST_BYTES_PER_UNIT);
                continue;
            }
        }
        let stop = element(cpu, bus, &op)?;
        count -= 1;
        set_addr_reg(cpu, &op, reg::RCX, count);
        spent += 1;
        if stop {
            break;
        }
    }
    Ok(())
}

/// One iteration, updating RSI/RDI (and RAX or flags) only after its
/// accesses succeeded. Returns true when REPE/REPNE must stop after it.
fn element(cpu: &mut Cpu, bus: &mut dyn Bus, op: &Op) -> ExecResult<bool> {
    let size = op.size;
    let si = addr_reg(cpu, op, reg::RSI);
    let di = addr_reg(cpu, op, reg::RDI);
    match op.kind {
        Kind::Movs => {
            let v = cpu.read_sized(bus, op.src_seg, si, size)?;
            cpu.write_sized(bus, Seg::Es, di, size, v)?;
            advance(cpu, op, reg::RSI, 1);
            advance(cpu, op, reg::RDI, 1);
        }
        Kind::Stos => {
            let v = cpu.state.gpr[reg::RAX];
            cpu.write_sized(bus, Seg::Es, di, size, v)?;
            advance(cpu, op, reg::RDI, 1);
        }
        Kind::Lods => {
            let v = cpu.read_sized(bus, op.src_seg, si, size)?;
            let dst = match size {
                1 => Register::AL,
                2 => Register::AX,
                4 => Register::EAX,
                _ => Register::RAX,
            };
            cpu.set_reg(dst, v);
            advance(cpu, op, reg::RSI, 1);
        }
        Kind::Cmps | Kind::Scas => {
            let a = if op.kind == Kind::Cmps {
                cpu.read_sized(bus, op.src_seg, si, size)?
            } else {
                cpu.state.gpr[reg::RAX]
            };
            let b = cpu.read_sized(bus, Seg::Es, di, size)?;
            let f = sub_flags(a, b, size);
            set_status(&mut cpu.state.rflags, f);
            if op.kind == Kind::Cmps {
                advance(cpu, op, reg::RSI, 1);
            }
            advance(cpu, op, reg::RDI, 1);
            let zf = f & flags::ZF != 0;
            return Ok(match op.rep {
                Rep::WhileEqual => !zf,
                Rep::WhileNotEqual => zf,
                _ => false,
            });
        }
        Kind::Ins => {
            // The destination must be writable before the port is read:
            // reading a port has side effects and cannot be repeated.
            let lin = cpu.linear(Seg::Es, di, size as u64, true)?;
            probe_write(cpu, bus, lin, size)?;
            let port = cpu.state.gpr[reg::RDX] as u16;
            let v = bus.io_in(port, size as u8);
            cpu.write_sized(bus, Seg::Es, di, size, v as u64)?;
            advance(cpu, op, reg::RDI, 1);
        }
        Kind::Outs => {
            let v = cpu.read_sized(bus, op.src_seg, si, size)?;
            let port = cpu.state.gpr[reg::RDX] as u16;
            bus.io_out(port, size as u8, v as u32);
            advance(cpu, op, reg::RSI, 1);
        }
    }
    Ok(false)
}

/// Fault now if a write of `size` bytes at `lin` would fault.
fn probe_write(cpu: &mut Cpu, bus: &mut dyn Bus, lin: u64, size: u32) -> ExecResult {
    cpu.host_range(bus, lin, 1, true)?;
    let last = lin.wrapping_add(size as u64 - 1);
    if last & !(PAGE_SIZE - 1) != lin & !(PAGE_SIZE - 1) {
        let last = if cpu.state.long_mode() {
            last
        } else {
            last & 0xffff_ffff
        };
        cpu.host_range(bus, last, 1, true)?;
    }
    Ok(())
}

/// REP MOVS / REP STOS with DF=0 on RAM: copy or fill as many whole
/// elements as fit in the current source and destination pages, through
/// host pointers. Returns the number of elements done, 0 when this chunk
/// must go element by element (MMIO, page-straddling element, segment
/// limit, alignment checking, close overlap).
fn fast_chunk(cpu: &mut Cpu, bus: &mut dyn Bus, op: &Op, count: u64) -> ExecResult<u64> {
    if !matches!(op.kind, Kind::Movs | Kind::Stos) || cpu.state.rflags & flags::DF != 0 {
        return Ok(0);
    }
    let s = &cpu.state;
    if op.size > 1 && s.rflags & flags::AC != 0 && s.cr0 & cr::CR0_AM != 0 && s.cpl() == 3 {
        return Ok(0);
    }
    let size = op.size as u64;
    let mask = size_mask(op.addr_size);
    let di = addr_reg(cpu, op, reg::RDI);
    // Bytes before the offset wraps around the address size.
    let room = |off: u64| (mask - off).saturating_add(1);
    let mut bytes = count.saturating_mul(size).min(room(di));
    // Segment faults are left to the element loop, which orders them.
    let Ok(dst_lin) = cpu.linear(Seg::Es, di, 1, true) else {
        return Ok(0);
    };
    bytes = bytes.min(PAGE_SIZE - (dst_lin & (PAGE_SIZE - 1)));
    let mut src_lin = 0;
    let si = addr_reg(cpu, op, reg::RSI);
    if op.kind == Kind::Movs {
        bytes = bytes.min(room(si));
        let Ok(lin) = cpu.linear(op.src_seg, si, 1, false) else {
            return Ok(0);
        };
        src_lin = lin;
        bytes = bytes.min(PAGE_SIZE - (src_lin & (PAGE_SIZE - 1)));
    }
    let elements = bytes / size;
    if elements == 0 {
        return Ok(0);
    }
    let len = elements * size;
    // Segment limits for the whole chunk; a limit inside the chunk is left
    // to the element loop so the fault is precise.
    if cpu.linear(Seg::Es, di, len, true).is_err()
        || (op.kind == Kind::Movs && cpu.linear(op.src_seg, si, len, false).is_err())
    {
        return Ok(0);
    }
    let len = len as usize;
    // Translate in the order the first element accesses memory.
    let src = if op.kind == Kind::Movs {
        match cpu.host_range(bus, src_lin, len, false)? {
            Some((p, _)) => Some(p),
            None => return Ok(0),
        }
    } else {
        None
    };
    let Some((dst, dst_phys)) = cpu.host_range(bus, dst_lin, len, true)? else {
        return Ok(0);
    };
    let d = dst.as_ptr();
    match src {
        Some(src) => {
            let sp = src.as_ptr();
            let distance = (d as usize).wrapping_sub(sp as usize);
            if distance == 0 {
                // Copying onto itself changes nothing.
            } else if distance < len {
                // Forward overlap: element by element, each element reads
                // bytes earlier elements wrote, so the data repeats with
                // period `distance`. Copying `distance`-byte pieces in
                // order does the same when no element straddles its own
                // write.
                if distance < op.size as usize {
                    return Ok(0);
                }
                let mut off = 0;
                while off < len {
                    let n = distance.min(len - off);
                    // SAFETY: both ranges lie inside the chunks vouched for
                    // by `host_range` (off + n <= len); the piece read ends
                    // where the piece written starts (n <= distance), so
                    // they do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(sp.add(off), d.add(off), n) };
                    off += n;
                }
            } else {
                // Disjoint, or the destination is below the source: an
                // element never reads bytes an earlier element wrote, which
                // is what memmove does.
                // SAFETY: `host_range` vouched for `len` bytes at both.
                unsafe { std::ptr::copy(sp, d, len) };
            }
        }
        None => {
            let pattern = cpu.state.gpr[reg::RAX].to_le_bytes();
            // SAFETY: `host_range` vouched for `len` bytes at `d`; the
            // doubling copies read the already filled prefix and write right
            // after it, so source and destination never overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(pattern.as_ptr(), d, op.size as usize);
                let mut filled = op.size as usize;
                while filled < len {
                    let n = filled.min(len - filled);
                    std::ptr::copy_nonoverlapping(d, d.add(filled), n);
                    filled += n;
                }
            }
        }
    }
    cpu.note_code_write(dst_phys);
    if op.kind == Kind::Movs {
        advance(cpu, op, reg::RSI, elements);
    }
    advance(cpu, op, reg::RDI, elements);
    Ok(elements)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exception::vector;
    use crate::state::{CpuState, Segment};
    use crate::testbus::TestBus;

    const CODE: u64 = 0x10000;
    const RAM: u64 = 1 << 21;

    /// Long mode, the first 2 MiB identity-mapped with 4 KiB pages (PT at
    /// 0x4000), a GDT, an IDT at 0x6000 and a stack at 0x80000.
    fn long_mode(bus: &mut TestBus) -> Cpu {
        bus.write_u64(0x1000, 0x2000 | 7);
        bus.write_u64(0x2000, 0x3000 | 7);
        bus.write_u64(0x3000, 0x4000 | 7);
        for i in 0..512u64 {
            bus.write_u64(0x4000 + i * 8, (i << 12) | 7);
        }
        bus.write_u64(0x5010, 0x00af_9b00_0000_ffff);
        bus.write_u64(0x5018, 0x00cf_9300_0000_ffff);
        let mut s = CpuState::long_mode_flat(0x1000);
        s.gdtr.base = 0x5000;
        s.gdtr.limit = 0x7f;
        s.idtr.base = 0x6000;
        s.idtr.limit = 0xfff;
        s.tr.base = 0x7000;
        s.rflags = flags::FIXED1;
        s.gpr[reg::RSP] = 0x8_0000;
        let mut cpu = Cpu::standalone(RAM);
        cpu.set_state(s);
        cpu
    }

    /// An interrupt gate for `vec` to `target` in the IDT at 0x6000.
    fn set_gate(bus: &mut TestBus, vec: u64, target: u64) {
        let lo = (target & 0xffff) | (0x10 << 16) | (0xe << 40) | (1 << 47) | ((target & 0xffff_0000) << 32);
        bus.write_u64(0x6000 + vec * 16, lo);
        bus.write_u64(0x6000 + vec * 16 + 8, target >> 32);
    }

    fn step_code(cpu: &mut Cpu, bus: &mut TestBus, code: &[u8]) {
        bus.load(CODE, code);
        // The bus write bypasses code-page tracking: drop decoded blocks.
        cpu.flush_translations();
        cpu.state.rip = CODE;
        cpu.step(bus);
    }

    fn ram(bus: &TestBus, at: u64, len: usize) -> Vec<u8> {
        bus.ram()[at as usize..at as usize + len].to_vec()
    }

    #[test]
    fn address_size_prefix_uses_esi_edi_ecx() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        bus.load(0x2_0000, b"hello, world");
        cpu.state.gpr[reg::RSI] = 0xdead_0000_0002_0000;
        cpu.state.gpr[reg::RDI] = 0xbeef_0000_0003_0000;
        cpu.state.gpr[reg::RCX] = 0xffff_ffff_0000_0005;
        // addr32 rep movsb
        step_code(&mut cpu, &mut bus, &[0x67, 0xf3, 0xa4]);
        assert_eq!(ram(&bus, 0x3_0000, 6), b"hello\0");
        assert_eq!(cpu.state.gpr[reg::RSI], 0x2_0005);
        assert_eq!(cpu.state.gpr[reg::RDI], 0x3_0005);
        assert_eq!(cpu.state.gpr[reg::RCX], 0);
        assert_eq!(cpu.state.rip, CODE + 3);

        // addr32 stosd with DF=1: EDI goes down, the upper half is cleared.
        cpu.state.rflags |= flags::DF;
        cpu.state.gpr[reg::RDI] = 0x1234_5678_0003_0000;
        cpu.state.gpr[reg::RAX] = 0xaabb_ccdd;
        step_code(&mut cpu, &mut bus, &[0x67, 0xab]);
        assert_eq!(bus.read_u32(0x3_0000), 0xaabb_ccdd);
        assert_eq!(cpu.state.gpr[reg::RDI], 0x2_fffc);
    }

    #[test]
    fn real_mode_rep_movsb_wraps_si_and_keeps_upper_bits() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = Cpu::standalone(RAM);
        cpu.state.segs[Seg::Cs as usize] = Segment::real_mode(0x1000, true);
        cpu.state.segs[Seg::Ds as usize] = Segment::real_mode(0x2000, false);
        cpu.state.segs[Seg::Es as usize] = Segment::real_mode(0x3000, false);
        cpu.state.rflags = flags::FIXED1;
        bus.load(0x2_fffe, &[1, 2]);
        bus.load(0x2_0000, &[3, 4]);
        cpu.state.gpr[reg::RSI] = 0x7777_fffe;
        cpu.state.gpr[reg::RDI] = 0x8888_0010;
        cpu.state.gpr[reg::RCX] = 0x9999_0004;
        bus.load(CODE, &[0xf3, 0xa4]);
        cpu.state.rip = 0; // CS base is CODE
        cpu.step(&mut bus);
        assert_eq!(cpu.state.rip, 2);
        assert_eq!(ram(&bus, 0x3_0010, 4), [1, 2, 3, 4]);
        assert_eq!(cpu.state.gpr[reg::RSI], 0x7777_0002);
        assert_eq!(cpu.state.gpr[reg::RDI], 0x8888_0014);
        assert_eq!(cpu.state.gpr[reg::RCX], 0x9999_0000);
        // A word at offset 0xffff crosses the segment limit: #GP, nothing moved.
        let mut cpu2 = Cpu::standalone(RAM);
        cpu2.state = cpu.state.clone();
        cpu2.state.gpr[reg::RSI] = 0xffff;
        cpu2.state.gpr[reg::RCX] = 1;
        let ins = decode(16, &[0xf3, 0xa5]);
        assert_eq!(movs(&mut cpu2, &mut bus, &ins), Err(Fault::gp0()));
        assert_eq!(cpu2.state.gpr[reg::RCX], 1);
    }

    fn decode(bits: u32, code: &[u8]) -> Instruction {
        let mut d = iced_x86::Decoder::with_ip(bits, code, CODE, iced_x86::DecoderOptions::NONE);
        d.decode()
    }

    #[test]
    fn segment_override_on_source_only() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        cpu.state.segs[Seg::Fs as usize].base = 0x4_0000;
        bus.load(0x4_0100, &[0x5a; 8]);
        cpu.state.gpr[reg::RSI] = 0x100;
        cpu.state.gpr[reg::RDI] = 0x5_0000;
        // fs movsq
        step_code(&mut cpu, &mut bus, &[0x64, 0x48, 0xa5]);
        assert_eq!(bus.read_u64(0x5_0000), 0x5a5a_5a5a_5a5a_5a5a);
        // fs lodsb / fs outsb read through FS as well.
        cpu.state.gpr[reg::RSI] = 0x100;
        step_code(&mut cpu, &mut bus, &[0x64, 0xac]);
        assert_eq!(cpu.state.gpr[reg::RAX] & 0xff, 0x5a);
    }

    #[test]
    fn string_movsd_and_cmpsd_are_routed_here() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        bus.write_u32(0x2_0000, 0x1122_3344);
        cpu.state.gpr[reg::RSI] = 0x2_0000;
        cpu.state.gpr[reg::RDI] = 0x3_0000;
        step_code(&mut cpu, &mut bus, &[0xa5]);
        assert_eq!(bus.read_u32(0x3_0000), 0x1122_3344);
        assert_eq!(cpu.stats.exceptions, 0);
        cpu.state.gpr[reg::RSI] = 0x2_0000;
        cpu.state.gpr[reg::RDI] = 0x3_0000;
        step_code(&mut cpu, &mut bus, &[0xa7]);
        assert_ne!(cpu.state.rflags & flags::ZF, 0);
        assert_eq!(cpu.stats.exceptions, 0);
    }

    #[test]
    fn long_rep_resumes_at_the_instruction() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        // rep stosb over 200 KiB: several calls.
        let n = 200 * 1024;
        cpu.state.gpr[reg::RDI] = 0x2_0000;
        cpu.state.gpr[reg::RCX] = n;
        cpu.state.gpr[reg::RAX] = 0xa5;
        step_code(&mut cpu, &mut bus, &[0xf3, 0xaa]);
        assert_eq!(cpu.state.rip, CODE);
        let left = cpu.state.gpr[reg::RCX];
        assert!(left > 0 && left < n);
        assert_eq!(cpu.state.gpr[reg::RDI], 0x2_0000 + (n - left));
        let mut calls = 1;
        while cpu.state.rip == CODE {
            cpu.step(&mut bus);
            calls += 1;
            assert!(calls < 1000);
        }
        assert_eq!(cpu.state.rip, CODE + 2);
        assert_eq!(cpu.state.gpr[reg::RCX], 0);
        assert!(bus.ram()[0x2_0000..0x2_0000 + n as usize].iter().all(|&b| b == 0xa5));
        assert_eq!(bus.ram()[0x2_0000 + n as usize], 0);

        // The element loop (DF=1) is bounded too: 10000 words.
        cpu.state.rflags |= flags::DF;
        cpu.state.gpr[reg::RDI] = 0x8_0000;
        cpu.state.gpr[reg::RCX] = 10_000;
        step_code(&mut cpu, &mut bus, &[0xf3, 0x66, 0xab]);
        assert_eq!(cpu.state.rip, CODE);
        assert_eq!(cpu.state.gpr[reg::RCX], 10_000 - REP_BUDGET);
        assert_eq!(cpu.state.gpr[reg::RDI], 0x8_0000 - 2 * REP_BUDGET);
    }

    #[test]
    fn rep_with_zero_count_does_nothing() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        cpu.state.gpr[reg::RSI] = 0x4_0000_0000_0000; // unmapped: must not be touched
        cpu.state.gpr[reg::RDI] = 0x4_0000_0000_0000;
        cpu.state.rflags |= flags::ZF;
        for code in [
            &[0xf3, 0xa4][..],
            &[0xf3, 0xa6],
            &[0xf2, 0xae],
            &[0xf3, 0x48, 0xab],
            &[0xf3, 0x6c],
        ] {
            step_code(&mut cpu, &mut bus, code);
            assert_eq!(cpu.stats.exceptions, 0, "{code:x?}");
            assert_eq!(cpu.state.rip, CODE + code.len() as u64);
        }
        assert_ne!(cpu.state.rflags & flags::ZF, 0);
        assert!(bus.io_writes.is_empty());
    }

    #[test]
    fn repe_cmps_and_repne_scas_stop_early() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        bus.load(0x2_0000, b"abcdefgh");
        bus.load(0x3_0000, b"abcdXfgh");
        cpu.state.gpr[reg::RSI] = 0x2_0000;
        cpu.state.gpr[reg::RDI] = 0x3_0000;
        cpu.state.gpr[reg::RCX] = 8;
        step_code(&mut cpu, &mut bus, &[0xf3, 0xa6]);
        assert_eq!(cpu.state.gpr[reg::RCX], 3);
        assert_eq!(cpu.state.gpr[reg::RSI], 0x2_0005);
        assert_eq!(cpu.state.rflags & flags::ZF, 0);
        // 'e' < 'X' is false: 0x65 - 0x58 has no borrow.
        assert_eq!(cpu.state.rflags & flags::CF, 0);

        cpu.state.gpr[reg::RDI] = 0x2_0000;
        cpu.state.gpr[reg::RCX] = 100;
        cpu.state.gpr[reg::RAX] = b'f' as u64;
        step_code(&mut cpu, &mut bus, &[0xf2, 0xae]);
        assert_eq!(cpu.state.gpr[reg::RCX], 94);
        assert_eq!(cpu.state.gpr[reg::RDI], 0x2_0006);
        assert_ne!(cpu.state.rflags & flags::ZF, 0);
    }

    #[test]
    fn page_fault_mid_rep_movsb_is_precise() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        set_gate(&mut bus, vector::PF as u64, 0x9000);
        bus.write_u64(0x4000 + 0x21 * 8, 0); // page 0x21000 not present
        for i in 0..0x200u64 {
            bus.ram_mut()[0x3_0000 + i as usize] = i as u8;
        }
        cpu.state.gpr[reg::RSI] = 0x3_0000;
        cpu.state.gpr[reg::RDI] = 0x2_0f00; // 0x100 bytes before the hole
        cpu.state.gpr[reg::RCX] = 0x180;
        step_code(&mut cpu, &mut bus, &[0xf3, 0xa4]);
        assert_eq!(cpu.state.rip, 0x9000, "the #PF was delivered");
        assert_eq!(cpu.state.cr2, 0x2_1000);
        assert_eq!(cpu.state.gpr[reg::RCX], 0x80);
        assert_eq!(cpu.state.gpr[reg::RSI], 0x3_0100);
        assert_eq!(cpu.state.gpr[reg::RDI], 0x2_1000);
        assert_eq!(ram(&bus, 0x2_0f00, 0x100), ram(&bus, 0x3_0000, 0x100));
        // The frame's return address is the REP instruction itself.
        let sp = cpu.state.gpr[reg::RSP];
        assert_eq!(bus.read_u64(sp), 2, "error code: write to a non-present page");
        assert_eq!(bus.read_u64(sp + 8), CODE);

        // The same with qwords and a source fault, through the element path
        // (DF=1): RCX/RSI/RDI stop at the last good element.
        let mut cpu = long_mode(&mut bus);
        bus.write_u64(0x4000 + 0x21 * 8, 0);
        cpu.state.rflags |= flags::DF;
        cpu.state.gpr[reg::RSI] = 0x2_1010;
        cpu.state.gpr[reg::RDI] = 0x5_0000;
        cpu.state.gpr[reg::RCX] = 10;
        let ins = decode(64, &[0xf3, 0x48, 0xa5]);
        let err = movs(&mut cpu, &mut bus, &ins).unwrap_err();
        assert_eq!(err.vector, vector::PF);
        assert_eq!(cpu.state.gpr[reg::RCX], 10);
        cpu.state.gpr[reg::RSI] = 0x2_2010;
        let err = movs(&mut cpu, &mut bus, &ins).unwrap_err();
        assert_eq!(err.cr2, Some(0x2_1ff8));
        assert_eq!(cpu.state.gpr[reg::RCX], 7);
        assert_eq!(cpu.state.gpr[reg::RSI], 0x2_1ff8);
        assert_eq!(cpu.state.gpr[reg::RDI], 0x4_ffe8);
    }

    #[test]
    fn rep_insb_reads_the_port_per_element() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        for i in 0..600u32 {
            bus.io_reads.push_back(i & 0xff);
        }
        cpu.state.gpr[reg::RDX] = 0x1f0;
        cpu.state.gpr[reg::RDI] = 0x2_0ff0; // crosses a page
        cpu.state.gpr[reg::RCX] = 600;
        step_code(&mut cpu, &mut bus, &[0xf3, 0x6c]);
        assert_eq!(cpu.state.rip, CODE + 2);
        assert_eq!(cpu.state.gpr[reg::RCX], 0);
        assert_eq!(cpu.state.gpr[reg::RDI], 0x2_0ff0 + 600);
        assert!(bus.io_reads.is_empty());
        for i in 0..600usize {
            assert_eq!(bus.ram()[0x2_0ff0 + i], i as u8);
        }
        // insw / insd
        bus.io_reads.extend([0xbeef, 0xdead_beef]);
        step_code(&mut cpu, &mut bus, &[0x66, 0x6d]);
        step_code(&mut cpu, &mut bus, &[0x6d]);
        assert_eq!(ram(&bus, 0x2_0ff0 + 600, 6), [0xef, 0xbe, 0xef, 0xbe, 0xad, 0xde]);
    }

    #[test]
    fn ins_does_not_read_the_port_when_the_write_faults() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        set_gate(&mut bus, vector::PF as u64, 0x9000);
        bus.write_u64(0x4000 + 0x21 * 8, 0);
        bus.io_reads.extend([1, 2, 3]);
        cpu.state.gpr[reg::RDI] = 0x2_0fff;
        // insw straddling into the missing page.
        step_code(&mut cpu, &mut bus, &[0x66, 0x6d]);
        assert_eq!(cpu.state.rip, 0x9000);
        assert_eq!(bus.io_reads.len(), 3);
    }

    #[test]
    fn rep_outs_writes_each_element() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        bus.load(0x2_0000, &[1, 0, 2, 0, 3, 0]);
        cpu.state.gpr[reg::RDX] = 0x3f8;
        cpu.state.gpr[reg::RSI] = 0x2_0000;
        cpu.state.gpr[reg::RCX] = 3;
        step_code(&mut cpu, &mut bus, &[0xf3, 0x66, 0x6f]);
        assert_eq!(bus.io_writes, [(0x3f8, 2, 1), (0x3f8, 2, 2), (0x3f8, 2, 3)]);
        assert_eq!(cpu.state.gpr[reg::RSI], 0x2_0006);
        step_code(&mut cpu, &mut bus, &[0x6e]);
        assert_eq!(bus.io_writes.last(), Some(&(0x3f8, 1, 0)));
    }

    #[test]
    fn io_permission_bitmap() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        cpu.state.segs[Seg::Cs as usize].dpl = 3;
        cpu.state.tr.limit = 0x67 + 0x2000 / 8 + 1;
        bus.ram_mut()[0x7066..0x7068].copy_from_slice(&0x68u16.to_le_bytes());
        // Deny everything, then allow ports 0x3f8..0x3ff.
        bus.ram_mut()[0x7068..0x7068 + 0x2000 / 8 + 1].fill(0xff);
        bus.ram_mut()[0x7068 + 0x3f8 / 8] = 0;
        assert_eq!(io_permitted(&mut cpu, &mut bus, 0x3f8, 1), Ok(()));
        assert_eq!(io_permitted(&mut cpu, &mut bus, 0x3fc, 4), Ok(()));
        assert_eq!(io_permitted(&mut cpu, &mut bus, 0x3fe, 4), Err(Fault::gp0()));
        assert_eq!(io_permitted(&mut cpu, &mut bus, 0x60, 1), Err(Fault::gp0()));
        // Beyond the TSS limit.
        assert_eq!(io_permitted(&mut cpu, &mut bus, 0xfff8, 1), Err(Fault::gp0()));
        // IOPL 3 allows everything at CPL 3.
        cpu.state.rflags |= flags::IOPL;
        assert_eq!(io_permitted(&mut cpu, &mut bus, 0x60, 1), Ok(()));
        // A denied REP OUTS faults before any output.
        cpu.state.rflags &= !flags::IOPL;
        cpu.state.gpr[reg::RDX] = 0x60;
        cpu.state.gpr[reg::RCX] = 4;
        let ins = decode(64, &[0xf3, 0x6e]);
        assert_eq!(outs(&mut cpu, &mut bus, &ins), Err(Fault::gp0()));
        assert!(bus.io_writes.is_empty());
        assert_eq!(cpu.state.gpr[reg::RCX], 4);
        // CPL 0 needs no bitmap.
        cpu.state.segs[Seg::Cs as usize].dpl = 0;
        assert_eq!(io_permitted(&mut cpu, &mut bus, 0x60, 1), Ok(()));
    }

    #[test]
    fn fast_stos_invalidates_code() {
        let mut bus = TestBus::new(RAM);
        let mut cpu = long_mode(&mut bus);
        cpu.code_map.mark_code(0x2_0000);
        let tag = cpu.code_map.tag(0x2_0000);
        cpu.state.gpr[reg::RDI] = 0x2_0000;
        cpu.state.gpr[reg::RCX] = 16;
        step_code(&mut cpu, &mut bus, &[0xf3, 0x48, 0xab]);
        assert_ne!(cpu.code_map.tag(0x2_0000), tag);
        assert!(cpu.code_written);
    }

    #[test]
    fn element_sizes_from_iced() {
        for (code, size) in [
            (&[0xa4][..], 1),
            (&[0x66, 0xa5], 2),
            (&[0xa5], 4),
            (&[0x48, 0xa5], 8),
            (&[0x6c], 1),
            (&[0x66, 0x6d], 2),
            (&[0x6f], 4),
            (&[0x48, 0xaf], 8),
        ] {
            let cpu = Cpu::standalone(RAM);
            let ins = decode(64, code);
            assert_eq!(Op::decode(&cpu, &ins, Kind::Movs).size, size, "{code:x?}");
        }
    }
}
