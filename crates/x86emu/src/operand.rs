//! Reading and writing instruction operands: registers, memory operands
//! (effective address and segment) and immediates.

use iced_x86::{Instruction, OpKind, Register};

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};
use crate::state::Seg;

/// Map an iced segment register to ours.
#[inline]
pub fn seg_of(r: Register) -> Seg {
    match r {
        Register::ES => Seg::Es,
        Register::CS => Seg::Cs,
        Register::SS => Seg::Ss,
        Register::FS => Seg::Fs,
        Register::GS => Seg::Gs,
        _ => Seg::Ds,
    }
}

/// Mask of the low `size` bytes.
#[inline(always)]
pub fn size_mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Sign-extend the low `size` bytes of `v`.
#[inline(always)]
pub fn sign_extend(v: u64, size: u32) -> u64 {
    let shift = 64 - size * 8;
    (((v << shift) as i64) >> shift) as u64
}

impl Cpu {
    /// Read a general register (any width, including AH..BH).
    #[inline]
    pub fn get_reg(&self, r: Register) -> u64 {
        let g = &self.state.gpr;
        if r.is_gpr64() {
            g[r as usize - Register::RAX as usize]
        } else if r.is_gpr32() {
            g[r as usize - Register::EAX as usize] & 0xffff_ffff
        } else if r.is_gpr16() {
            g[r as usize - Register::AX as usize] & 0xffff
        } else if r.is_gpr8() {
            let i = r as usize - Register::AL as usize;
            // iced order: AL CL DL BL AH CH DH BH SPL BPL SIL DIL R8L..R15L
            if (4..8).contains(&i) {
                (g[i - 4] >> 8) & 0xff
            } else if i >= 8 {
                g[i - 4] & 0xff
            } else {
                g[i] & 0xff
            }
        } else if r == Register::RIP {
            self.state.rip
        } else if r == Register::EIP {
            self.state.rip & 0xffff_ffff
        } else if r.is_segment_register() {
            self.state.seg(seg_of(r)).selector as u64
        } else {
            0
        }
    }

    /// Write a general register with x86 semantics: 32-bit writes zero the
    /// upper half, 8/16-bit writes merge.
    #[inline]
    pub fn set_reg(&mut self, r: Register, v: u64) {
        let g = &mut self.state.gpr;
        if r.is_gpr64() {
            g[r as usize - Register::RAX as usize] = v;
        } else if r.is_gpr32() {
            g[r as usize - Register::EAX as usize] = v & 0xffff_ffff;
        } else if r.is_gpr16() {
            let x = &mut g[r as usize - Register::AX as usize];
            *x = (*x & !0xffff) | (v & 0xffff);
        } else if r.is_gpr8() {
            let i = r as usize - Register::AL as usize;
            if (4..8).contains(&i) {
                let x = &mut g[i - 4];
                *x = (*x & !0xff00) | ((v & 0xff) << 8);
            } else {
                let idx = if i >= 8 { i - 4 } else { i };
                let x = &mut g[idx];
                *x = (*x & !0xff) | (v & 0xff);
            }
        }
    }

    /// Effective address (offset within the segment) of the memory operand,
    /// wrapped to the address size.
    #[inline]
    pub fn effective_address(&self, ins: &Instruction) -> u64 {
        let base = ins.memory_base();
        let mut ea = ins.memory_displacement64();
        if base == Register::RIP || base == Register::EIP {
            // iced already folded the next IP into the displacement.
            return if base == Register::EIP { ea & 0xffff_ffff } else { ea };
        }
        if base != Register::None {
            ea = ea.wrapping_add(self.get_reg(base));
        }
        let index = ins.memory_index();
        if index != Register::None {
            ea = ea.wrapping_add(self.get_reg(index).wrapping_mul(ins.memory_index_scale() as u64));
        }
        // The base or index register's width is the address size; with
        // neither, the instruction's address size decides.
        let bits = if base.is_gpr64() || index.is_gpr64() {
            64
        } else if base.is_gpr32() || index.is_gpr32() {
            32
        } else if base.is_gpr16() || index.is_gpr16() {
            16
        } else {
            self.address_bits(ins)
        };
        match bits {
            64 => ea,
            32 => ea & 0xffff_ffff,
            _ => ea & 0xffff,
        }
    }

    /// Address size of an instruction in bits.
    #[inline]
    pub fn address_bits(&self, ins: &Instruction) -> u32 {
        let code = self.state.code_bits();
        let prefixed = ins.has_address_size_prefix_hint();
        match (code, prefixed) {
            (64, false) => 64,
            (64, true) => 32,
            (32, false) => 32,
            (32, true) => 16,
            (_, false) => 16,
            (_, true) => 32,
        }
    }

    /// Segment of the memory operand (prefix or default).
    #[inline]
    pub fn mem_seg(&self, ins: &Instruction) -> Seg {
        seg_of(ins.memory_segment())
    }

    /// Size in bytes of operand `n`.
    #[inline]
    pub fn op_size(&self, ins: &Instruction, n: u32) -> u32 {
        match ins.op_kind(n) {
            OpKind::Register => ins.op_register(n).size() as u32,
            OpKind::Memory => ins.memory_size().size() as u32,
            OpKind::Immediate8 => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            _ => 8,
        }
    }

    /// Read operand `n` as an integer (zero-extended to 64 bits; immediates
    /// sign-extended to their operand size as encoded).
    #[inline]
    pub fn read_op(&mut self, bus: &mut dyn Bus, ins: &Instruction, n: u32) -> ExecResult<u64> {
        match ins.op_kind(n) {
            OpKind::Register => Ok(self.get_reg(ins.op_register(n))),
            OpKind::Memory => {
                let size = ins.memory_size().size() as u32;
                let ea = self.effective_address(ins);
                self.read_sized(bus, self.mem_seg(ins), ea, size)
            }
            OpKind::Immediate8 => Ok(ins.immediate8() as u64),
            OpKind::Immediate16 => Ok(ins.immediate16() as u64),
            OpKind::Immediate32 => Ok(ins.immediate32() as u64),
            OpKind::Immediate64 => Ok(ins.immediate64()),
            OpKind::Immediate8to16 => Ok(ins.immediate8to16() as u16 as u64),
            OpKind::Immediate8to32 => Ok(ins.immediate8to32() as u32 as u64),
            OpKind::Immediate8to64 => Ok(ins.immediate8to64() as u64),
            OpKind::Immediate32to64 => Ok(ins.immediate32to64() as u64),
            OpKind::Immediate8_2nd => Ok(ins.immediate8_2nd() as u64),
            _ => Err(Fault::ud()),
        }
    }

    /// Write operand `n` (register or memory) with its own size.
    #[inline]
    pub fn write_op(&mut self, bus: &mut dyn Bus, ins: &Instruction, n: u32, v: u64) -> ExecResult {
        match ins.op_kind(n) {
            OpKind::Register => {
                self.set_reg(ins.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => {
                let size = ins.memory_size().size() as u32;
                let ea = self.effective_address(ins);
                self.write_sized(bus, self.mem_seg(ins), ea, size, v)
            }
            _ => Err(Fault::ud()),
        }
    }

    /// Read-modify-write operand 0: for memory this is one locked or plain
    /// update (honouring the LOCK prefix); for a register it is a plain update.
    /// `f` returns the new value; the old value is returned.
    #[inline]
    pub fn rmw_op(&mut self, bus: &mut dyn Bus, ins: &Instruction, f: &mut dyn FnMut(u64) -> u64) -> ExecResult<u64> {
        match ins.op_kind(0) {
            OpKind::Register => {
                let r = ins.op_register(0);
                let old = self.get_reg(r);
                let new = f(old);
                self.set_reg(r, new);
                Ok(old)
            }
            OpKind::Memory => {
                let size = ins.memory_size().size() as u32;
                let ea = self.effective_address(ins);
                let seg = self.mem_seg(ins);
                self.rmw(bus, seg, ea, size, ins.has_lock_prefix(), f)
            }
            _ => Err(Fault::ud()),
        }
    }

    /// Operand size in bytes of the instruction's main operation, taken from
    /// operand 0 (or 1 when operand 0 is absent).
    #[inline]
    pub fn main_size(&self, ins: &Instruction) -> u32 {
        if ins.op_count() == 0 {
            return match self.state.code_bits() {
                16 => 2,
                _ => 4,
            };
        }
        self.op_size(ins, 0)
    }

    /// Stack push of `size` bytes.
    pub fn push(&mut self, bus: &mut dyn Bus, v: u64, size: u32) -> ExecResult {
        let bits = self.state.stack_bits();
        let sp = self.state.gpr[4];
        let new_sp = sp.wrapping_sub(size as u64);
        let off = match bits {
            64 => new_sp,
            32 => new_sp & 0xffff_ffff,
            _ => new_sp & 0xffff,
        };
        self.write_sized(bus, Seg::Ss, off, size, v)?;
        self.set_sp(new_sp);
        Ok(())
    }

    /// Stack pop of `size` bytes.
    pub fn pop(&mut self, bus: &mut dyn Bus, size: u32) -> ExecResult<u64> {
        let sp = self.sp();
        let v = self.read_sized(bus, Seg::Ss, sp, size)?;
        self.set_sp(sp.wrapping_add(size as u64));
        Ok(v)
    }

    /// The stack pointer wrapped to the stack size.
    pub fn sp(&self) -> u64 {
        let sp = self.state.gpr[4];
        match self.state.stack_bits() {
            64 => sp,
            32 => sp & 0xffff_ffff,
            _ => sp & 0xffff,
        }
    }

    /// Update the stack pointer keeping the bits outside the stack size.
    pub fn set_sp(&mut self, v: u64) {
        let bits = self.state.stack_bits();
        let sp = &mut self.state.gpr[4];
        match bits {
            64 => *sp = v,
            32 => *sp = v & 0xffff_ffff,
            _ => *sp = (*sp & !0xffff) | (v & 0xffff),
        }
    }

    /// Operand size in bytes of a push/pop/call/ret, from iced's stack
    /// pointer increment (which includes a RET's immediate).
    pub fn stack_op_size(&self, ins: &Instruction) -> u32 {
        let inc = ins.stack_pointer_increment().unsigned_abs();
        let imm = if ins.mnemonic() == iced_x86::Mnemonic::Ret || ins.mnemonic() == iced_x86::Mnemonic::Retf {
            if ins.op_count() > 0 {
                ins.immediate16() as u32
            } else {
                0
            }
        } else {
            0
        };
        let size = inc.saturating_sub(imm);
        if ins.mnemonic() == iced_x86::Mnemonic::Retf {
            size / 2
        } else {
            size
        }
    }
}

trait PrefixHints {
    fn has_address_size_prefix_hint(&self) -> bool;
}

impl PrefixHints for Instruction {
    /// iced does not expose raw prefixes; derive them from the instruction's
    /// resolved sizes instead.
    fn has_address_size_prefix_hint(&self) -> bool {
        // The memory operand's base/index registers tell the address size;
        // for string instructions iced encodes it in the op kind.
        use iced_x86::OpKind as K;
        for n in 0..self.op_count() {
            match self.op_kind(n) {
                K::MemorySegSI | K::MemorySegDI | K::MemoryESDI => return self.code_size_bits() != 16,
                K::MemorySegESI | K::MemorySegEDI | K::MemoryESEDI => return self.code_size_bits() != 32,
                K::MemorySegRSI | K::MemorySegRDI | K::MemoryESRDI => return false,
                _ => {}
            }
        }
        let b = self.memory_base();
        let i = self.memory_index();
        let r = if b != Register::None && b != Register::RIP && b != Register::EIP {
            b
        } else {
            i
        };
        if b == Register::EIP {
            return true;
        }
        if r == Register::None {
            return false;
        }
        match self.code_size_bits() {
            64 => r.is_gpr32(),
            32 => r.is_gpr16(),
            _ => r.is_gpr32(),
        }
    }
}

trait CodeSizeBits {
    fn code_size_bits(&self) -> u32;
}

impl CodeSizeBits for Instruction {
    fn code_size_bits(&self) -> u32 {
        match self.code_size() {
            iced_x86::CodeSize::Code64 => 64,
            iced_x86::CodeSize::Code32 => 32,
            _ => 16,
        }
    }
}
