//! Host code for one decoded block, with iced-x86's assembler.
//!
//! Register use in generated code: RBX = the `Context` (for handler
//! calls), R12 = the `Cpu` (guest registers at `Layout` offsets from it),
//! R13 = instructions still allowed, R14 = instructions executed, R15 =
//! self-loop iterations left. RAX, RCX, RDX, R8 are scratch (R8B carries
//! a final Jcc's condition from the inline ALU op just before it). All
//! five are callee-saved in the SysV ABI, so handler calls keep them.
//!
//! Inline besides register ALU/MOV/LEA/IMUL: the block's final JMP/Jcc
//! rel, CALL rel32 and RET; PUSH/POP r64; MOV, MOVZX/MOVSX/MOVSXD loads
//! and stores of 1-8 bytes; ALU with one memory operand; SHL/SHR/SAR/ROL/ROR
//! by an immediate or CL; SHLD/SHRD r, r by an immediate or CL; one-operand
//! MUL/IMUL r32/r64; NEG/NOT r32/r64; SETcc; CMOVcc r, r; whole-XMM SSE2
//! moves, PCMPEQ*, PMINUB/PMAXUB, PAND/PANDN/POR/PXOR (and the PS/PD
//! bitwise forms), PADD*/PSUB* and PMOVMSKB (XMM0, XMM1 scratch). Memory goes through `lookup` (the
//! inline data-TLB; FS/GS bases are added at run time); its slow path
//! calls the handler, which leaves the exact interpreter state (the inline
//! code changes nothing before the access has succeeded).

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, ConditionCode, FlowControl, Instruction, Mnemonic as M, OpKind, Register};

use super::{Layout, MAX_LOOPS};
use crate::decode::Block;
use crate::state::flags::{AF, CF, OF, PF, SF, STATUS, ZF};
use crate::state::{Seg, Segment};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Alu {
    Add,
    Adc,
    Sub,
    Sbb,
    And,
    Or,
    Xor,
    Cmp,
    Test,
}

#[derive(Clone, Copy)]
enum Src {
    Reg(usize),
    /// Sign-extended to the operand size by the host instruction, as the
    /// guest encoding does.
    Imm(i32),
}

/// The forms emitted inline. Register numbers index the guest GPR file;
/// `wide` is a 64-bit operand (else 32-bit, zero-extended on write).
#[derive(Clone, Copy)]
enum Inline {
    MovRR {
        dst: usize,
        src: usize,
        wide: bool,
    },
    /// The final 64-bit register value.
    MovRI {
        dst: usize,
        value: u64,
    },
    Alu {
        op: Alu,
        dst: usize,
        src: Src,
        wide: bool,
    },
    IncDec {
        inc: bool,
        dst: usize,
        wide: bool,
    },
    Imul {
        dst: usize,
        src: usize,
        wide: bool,
    },
    Lea {
        dst: usize,
        base: Option<usize>,
        index: Option<(usize, u32)>,
        disp: u64,
        wide: bool,
    },
    /// MOV r, [mem] and MOV [mem], r through the inline data-TLB lookup;
    /// anything but a RAM hit within one page (a miss, MMIO, a page
    /// crossing, a store to a code page, a fault) calls the handler.
    Load {
        reg: usize,
        mem: Mem,
        wide: bool,
    },
    Store {
        reg: usize,
        mem: Mem,
        wide: bool,
    },
    /// MOVZX/MOVSX/MOVSXD and MOV r8/r16 from memory (through the inline
    /// data-TLB lookup, as `Load`) or, `mem` None, from the register
    /// operand at byte offset `src` in the GPR file. `dst`: the byte
    /// offset of the destination in the GPR file.
    LoadN {
        dst: i32,
        mem: Option<Mem>,
        src: i32,
        kind: LoadKind,
    },
    /// MOV [mem], r8/r16 or MOV [mem], imm of `size` bytes (as `Store`).
    StoreN {
        src: StoreSrc,
        mem: Mem,
        size: i32,
    },
    /// ADD/SUB/AND/OR/XOR/CMP/TEST with one memory operand through the
    /// inline data-TLB lookup (slow path = handler): `op r, [m]` or
    /// `op [m], r/imm` of 1 (immediate only), 4 or 8 bytes, done by the
    /// host instruction on the guest RAM.
    AluMem(AluMem),
    /// SHL/SHR/SAR/ROL/ROR r32/r64, imm8; `count` already masked.
    Shift {
        op: ShiftOp,
        dst: usize,
        count: u32,
        wide: bool,
    },
    /// SHL/SHR/SAR/ROL/ROR r32/r64, CL.
    ShiftCl {
        op: ShiftOp,
        dst: usize,
        wide: bool,
    },
    /// NEG/NOT r32/r64.
    NegNot {
        neg: bool,
        dst: usize,
        wide: bool,
    },
    /// MUL/IMUL r32/r64 with one operand: RDX:RAX (EDX:EAX) = the
    /// accumulator times `src`.
    MulAcc {
        signed: bool,
        src: usize,
        wide: bool,
    },
    /// SHLD/SHRD r32/r64, r32/r64, imm8 (`count` masked) or CL (None).
    DoubleShift {
        left: bool,
        dst: usize,
        src: usize,
        count: Option<u32>,
        wide: bool,
    },
    /// SETcc r8 (byte offset in the GPR file).
    Setcc {
        cc: ConditionCode,
        dst: i32,
    },
    /// CMOVcc r32/r64, r32/r64.
    Cmov {
        cc: ConditionCode,
        dst: usize,
        src: usize,
        wide: bool,
    },
    /// PUSH r64, POP r64, CALL rel32 (to a canonical target, at the block
    /// end) and RET in 64-bit mode, through the inline data-TLB lookup at
    /// RSP (SS base 0); anything else calls the handler, with RSP
    /// untouched until the access has succeeded.
    Stack(StackOp),
    /// Whole-XMM SSE2 forms (see `SseForm`).
    Sse(SseForm),
    /// The block's final JMP rel (`cc` None) or Jcc rel to a canonical
    /// target: stores the new RIP, as `jcc_rel64` and `jmp_rel64` do.
    Branch {
        cc: ConditionCode,
        target: u64,
        next: u64,
    },
}

/// The SSE2 forms emitted inline, on the guest register file. Memory goes
/// through the inline data-TLB lookup; a misaligned operand of a form
/// that requires alignment, SSE off (CR0.EM, CR0.TS, no CR4.OSFXSR) and
/// anything the lookup refuses call the handler, which raises what it
/// must.
#[derive(Clone, Copy)]
enum SseForm {
    /// A move or integer/bitwise op with an XMM register or 16-byte
    /// memory source (`op` None: a move): the host instruction.
    Load { op: Option<VecOp>, dst: usize, src: XmmSrc },
    /// MOVDQU/MOVDQA/MOVUPS/MOVAPS/MOVUPD/MOVAPD [mem], xmm.
    Store { src: usize, mem: Mem, aligned: bool },
    /// PMOVMSKB r32/r64, xmm (zero-extended into the 64-bit register).
    Pmovmskb { dst: usize, src: usize },
}

/// The source of an `SseForm::Load`.
#[derive(Clone, Copy)]
enum XmmSrc {
    Reg(usize),
    Mem { mem: Mem, aligned: bool },
}

/// The SSE2 operations on whole XMM registers emitted inline: each is the
/// host instruction of the same name (none reads or writes MXCSR or
/// RFLAGS).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum VecOp {
    Pcmpeqb,
    Pcmpeqw,
    Pcmpeqd,
    Pminub,
    Pmaxub,
    Pand,
    Pandn,
    Por,
    Pxor,
    Paddb,
    Paddw,
    Paddd,
    Paddq,
    Psubb,
    Psubw,
    Psubd,
    Psubq,
}

#[derive(Clone, Copy)]
struct AluMem {
    op: Alu,
    mem: Mem,
    /// `op [mem], src` (else `op reg, [mem]` with `src` the register).
    to_mem: bool,
    src: Src,
    size: i32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ShiftOp {
    Shl,
    Shr,
    Sar,
    /// Write CF and OF only.
    Rol,
    Ror,
}

/// How a narrow or extending load writes its register.
#[derive(Clone, Copy)]
enum LoadKind {
    /// MOVZX from 1 or 2 bytes (the 32- or 64-bit result is the same).
    Zero(u8),
    /// MOVSX/MOVSXD from 1, 2 or 4 bytes into a 64-bit (true) or 32-bit
    /// register (zero-extended on write).
    Sign(u8, bool),
    /// MOV r8/r16: replaces only those bytes.
    Merge(u8),
}

#[derive(Clone, Copy)]
enum StoreSrc {
    /// Byte offset of the register operand in the GPR file.
    Reg(i32),
    /// Sign-extended to the store size by the host instruction.
    Imm(i32),
}

#[derive(Clone, Copy)]
enum StackOp {
    Push(usize),
    Pop(usize),
    Call { target: u64, next: u64 },
    Ret,
}

/// A 64-bit address `base + index << shift + disp` in a segment whose base
/// is 0 in 64-bit mode (DS, SS, ES) or, `seg` set, in FS or GS (their base
/// is added at run time; a non-canonical sum misses the TLB, and the
/// handler raises the #GP).
#[derive(Clone, Copy)]
struct Mem {
    base: Option<usize>,
    index: Option<(usize, u32)>,
    disp: u64,
    seg: Option<Seg>,
}

impl Mem {
    fn of(ins: &Instruction) -> Option<Mem> {
        let seg = match (ins.segment_prefix(), ins.memory_segment()) {
            (Register::None, Register::DS | Register::SS | Register::ES) => None,
            (Register::FS, Register::FS) => Some(Seg::Fs),
            (Register::GS, Register::GS) => Some(Seg::Gs),
            _ => return None,
        };
        let base = match ins.memory_base() {
            Register::None | Register::RIP => None,
            r => Some(gpr(r, true)?),
        };
        let index = match ins.memory_index() {
            Register::None => None,
            r => Some((gpr(r, true)?, ins.memory_index_scale().trailing_zeros())),
        };
        Some(Mem {
            base,
            index,
            disp: ins.memory_displacement64(),
            seg,
        })
    }
}

impl Inline {
    /// Whether it reads the status flags (or keeps some of them, which for
    /// liveness is the same).
    fn reads_flags(&self) -> bool {
        matches!(
            self,
            Inline::Alu {
                op: Alu::Adc | Alu::Sbb,
                ..
            } | Inline::IncDec { .. }
        ) || matches!(self, Inline::Branch { cc, .. } if *cc != ConditionCode::None)
            || matches!(self, Inline::Setcc { .. } | Inline::Cmov { .. })
            || matches!(self, Inline::Shift { op: ShiftOp::Rol | ShiftOp::Ror, count, .. } if *count != 0)
            // By CL: a zero count keeps all of them.
            || matches!(self, Inline::DoubleShift { count: None, .. } | Inline::ShiftCl { .. })
    }

    /// Whether it writes all six status flags.
    /// Whether it may call the handler (which may fault, so the flags
    /// must be in RFLAGS before it).
    fn may_call(&self) -> bool {
        matches!(
            self,
            Inline::Load { .. }
                | Inline::Store { .. }
                | Inline::Stack(_)
                | Inline::LoadN { mem: Some(_), .. }
                | Inline::StoreN { .. }
                | Inline::AluMem(_)
                | Inline::Sse(_)
        )
    }

    /// Whether it stores the new RIP itself (a control transfer that ends
    /// the block).
    fn sets_rip(&self) -> bool {
        matches!(
            self,
            Inline::Branch { .. } | Inline::Stack(StackOp::Call { .. } | StackOp::Ret)
        )
    }

    fn writes_all_flags(&self) -> bool {
        matches!(
            self,
            Inline::Alu { .. }
                | Inline::Imul { .. }
                | Inline::AluMem(_)
                | Inline::MulAcc { .. }
                | Inline::NegNot { neg: true, .. }
        ) || matches!(self, Inline::DoubleShift { count: Some(c), .. } if *c != 0)
            || matches!(self, Inline::Shift { op: ShiftOp::Shl | ShiftOp::Shr | ShiftOp::Sar, count, .. } if *count != 0)
    }
}

/// Byte offset in the GPR file of an 8-bit (AH..BH: the second byte) or
/// 16-bit general register.
fn narrow_reg(r: Register) -> Option<i32> {
    if r.is_gpr8() {
        let i = r as i32 - Register::AL as i32;
        Some(match i {
            0..=3 => 8 * i,
            4..=7 => 8 * (i - 4) + 1,
            _ => 8 * (i - 4),
        })
    } else if r.is_gpr16() {
        Some(8 * (r as i32 - Register::AX as i32))
    } else {
        None
    }
}

/// MOVZX/MOVSX/MOVSXD and MOV with 8/16-bit operands, and MOV m, imm.
fn classify_narrow(ins: &Instruction) -> Option<Inline> {
    let load = |kind| {
        let (mem, src) = match ins.op1_kind() {
            OpKind::Memory => (Some(Mem::of(ins)?), 0),
            OpKind::Register => (None, narrow_reg(ins.op1_register())?),
            _ => return None,
        };
        let dst = match kind {
            LoadKind::Merge(_) => narrow_reg(ins.op0_register())?,
            _ => 8 * gpr(ins.op0_register(), ins.op0_register().is_gpr64())? as i32,
        };
        Some(Inline::LoadN { dst, mem, src, kind })
    };
    let store = |size, src| {
        if ins.op0_kind() != OpKind::Memory {
            return None;
        }
        Some(Inline::StoreN {
            src,
            mem: Mem::of(ins)?,
            size,
        })
    };
    let mem_dst = ins.op0_kind() == OpKind::Memory;
    match ins.code() {
        Code::Movzx_r32_rm8 | Code::Movzx_r64_rm8 => load(LoadKind::Zero(1)),
        Code::Movzx_r32_rm16 | Code::Movzx_r64_rm16 => load(LoadKind::Zero(2)),
        Code::Movsx_r32_rm8 => load(LoadKind::Sign(1, false)),
        Code::Movsx_r64_rm8 => load(LoadKind::Sign(1, true)),
        Code::Movsx_r32_rm16 => load(LoadKind::Sign(2, false)),
        Code::Movsx_r64_rm16 => load(LoadKind::Sign(2, true)),
        Code::Movsxd_r64_rm32 => load(LoadKind::Sign(4, true)),
        Code::Mov_r8_rm8 if ins.op1_kind() == OpKind::Memory => load(LoadKind::Merge(1)),
        Code::Mov_r16_rm16 if ins.op1_kind() == OpKind::Memory => load(LoadKind::Merge(2)),
        Code::Mov_rm8_r8 if mem_dst => store(1, StoreSrc::Reg(narrow_reg(ins.op1_register())?)),
        Code::Mov_rm16_r16 if mem_dst => store(2, StoreSrc::Reg(narrow_reg(ins.op1_register())?)),
        Code::Mov_rm8_imm8 => store(1, StoreSrc::Imm(ins.immediate8() as i8 as i32)),
        Code::Mov_rm16_imm16 => store(2, StoreSrc::Imm(ins.immediate16() as i16 as i32)),
        Code::Mov_rm32_imm32 if mem_dst => store(4, StoreSrc::Imm(ins.immediate32() as i32)),
        Code::Mov_rm64_imm32 if mem_dst => store(8, StoreSrc::Imm(ins.immediate32to64() as i32)),
        _ => None,
    }
}

/// Index of a 64-bit (`wide`) or 32-bit general register, if `r` is one.
fn gpr(r: Register, wide: bool) -> Option<usize> {
    if wide && r.is_gpr64() {
        Some(r as usize - Register::RAX as usize)
    } else if !wide && r.is_gpr32() {
        Some(r as usize - Register::EAX as usize)
    } else {
        None
    }
}

/// The inline form of `ins`, if it has one.
fn classify(ins: &Instruction) -> Option<Inline> {
    if ins.has_lock_prefix() {
        return None;
    }
    let stack = match ins.code() {
        Code::Push_r64 => Some(StackOp::Push(gpr(ins.op0_register(), true)?)),
        Code::Pop_r64 => Some(StackOp::Pop(gpr(ins.op0_register(), true)?)),
        Code::Call_rel32_64 if crate::memory::is_canonical(ins.near_branch64()) => Some(StackOp::Call {
            target: ins.near_branch64(),
            next: ins.next_ip(),
        }),
        Code::Retnq => Some(StackOp::Ret),
        _ => None,
    };
    if let Some(op) = stack {
        return Some(Inline::Stack(op));
    }
    if ins.op_count() == 0 {
        return None;
    }
    if ins.op0_kind() == OpKind::NearBranch64
        && (ins.is_jcc_short_or_near() || matches!(ins.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64))
    {
        // A non-canonical target faults: the handler raises it.
        let target = ins.near_branch64();
        return crate::memory::is_canonical(target).then_some(Inline::Branch {
            cc: ins.condition_code(),
            target,
            next: ins.next_ip(),
        });
    }
    if let Some(f) = classify_narrow(ins) {
        return Some(f);
    }
    if ins.op0_kind() == OpKind::Register
        && ins.op0_register().is_gpr8()
        && matches!(
            ins.mnemonic(),
            M::Seto
                | M::Setno
                | M::Setb
                | M::Setae
                | M::Sete
                | M::Setne
                | M::Setbe
                | M::Seta
                | M::Sets
                | M::Setns
                | M::Setp
                | M::Setnp
                | M::Setl
                | M::Setge
                | M::Setle
                | M::Setg
        )
    {
        return Some(Inline::Setcc {
            cc: ins.condition_code(),
            dst: narrow_reg(ins.op0_register())?,
        });
    }
    if matches!(ins.code(), Code::Mov_rm64_r64 | Code::Mov_rm32_r32)
        && ins.op0_kind() == OpKind::Memory
        && ins.op1_kind() == OpKind::Register
    {
        let wide = ins.code() == Code::Mov_rm64_r64;
        return Some(Inline::Store {
            reg: gpr(ins.op1_register(), wide)?,
            mem: Mem::of(ins)?,
            wide,
        });
    }
    if let Some(f) = classify_alu_mem(ins) {
        return Some(f);
    }
    if let Some(f) = classify_sse(ins) {
        return Some(f);
    }
    if ins.op0_kind() != OpKind::Register {
        return None;
    }
    let r0 = ins.op0_register();
    let wide = r0.is_gpr64();
    let dst = gpr(r0, wide)?;
    let reg1 = || {
        if ins.op_count() == 2 && ins.op1_kind() == OpKind::Register {
            gpr(ins.op1_register(), wide)
        } else {
            None
        }
    };
    match ins.code() {
        Code::Mov_r64_rm64 | Code::Mov_r32_rm32 if ins.op1_kind() == OpKind::Memory => {
            return Some(Inline::Load {
                reg: dst,
                mem: Mem::of(ins)?,
                wide,
            })
        }
        Code::Mov_rm64_r64 | Code::Mov_r64_rm64 | Code::Mov_rm32_r32 | Code::Mov_r32_rm32 => {
            return Some(Inline::MovRR {
                dst,
                src: reg1()?,
                wide,
            });
        }
        Code::Mov_r32_imm32 => {
            return Some(Inline::MovRI {
                dst,
                value: ins.immediate32() as u64,
            })
        }
        Code::Mov_r64_imm64 => {
            return Some(Inline::MovRI {
                dst,
                value: ins.immediate64(),
            })
        }
        Code::Mov_rm64_imm32 => {
            return Some(Inline::MovRI {
                dst,
                value: ins.immediate32to64() as u64,
            })
        }
        Code::Lea_r64_m | Code::Lea_r32_m => return lea(ins, dst, wide),
        _ => {}
    }
    if matches!(ins.mnemonic(), M::Neg | M::Not) && ins.op_count() == 1 {
        return Some(Inline::NegNot {
            neg: ins.mnemonic() == M::Neg,
            dst,
            wide,
        });
    }
    if matches!(ins.mnemonic(), M::Mul | M::Imul) && ins.op_count() == 1 {
        return Some(Inline::MulAcc {
            signed: ins.mnemonic() == M::Imul,
            src: dst,
            wide,
        });
    }
    if matches!(ins.mnemonic(), M::Shld | M::Shrd) && ins.op_count() == 3 {
        let count = match ins.op2_kind() {
            OpKind::Immediate8 => Some(ins.immediate8() as u32 & if wide { 63 } else { 31 }),
            OpKind::Register if ins.op2_register() == Register::CL => None,
            _ => return None,
        };
        return Some(Inline::DoubleShift {
            left: ins.mnemonic() == M::Shld,
            dst,
            src: if ins.op1_kind() == OpKind::Register {
                gpr(ins.op1_register(), wide)?
            } else {
                return None;
            },
            count,
            wide,
        });
    }
    let shift = match ins.mnemonic() {
        M::Shl => Some(ShiftOp::Shl),
        M::Shr => Some(ShiftOp::Shr),
        M::Sar => Some(ShiftOp::Sar),
        M::Rol => Some(ShiftOp::Rol),
        M::Ror => Some(ShiftOp::Ror),
        _ => None,
    };
    if let Some(op) = shift {
        if ins.op_count() == 2 && ins.op1_kind() == OpKind::Register && ins.op1_register() == Register::CL {
            return Some(Inline::ShiftCl { op, dst, wide });
        }
        if ins.op_count() != 2 || ins.op1_kind() != OpKind::Immediate8 {
            return None;
        }
        return Some(Inline::Shift {
            op,
            dst,
            count: ins.immediate8() as u32 & if wide { 63 } else { 31 },
            wide,
        });
    }
    if matches!(
        ins.mnemonic(),
        M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
    ) {
        return Some(Inline::Cmov {
            cc: ins.condition_code(),
            dst,
            src: reg1()?,
            wide,
        });
    }
    let op = match ins.mnemonic() {
        M::Add => Alu::Add,
        M::Adc => Alu::Adc,
        M::Sub => Alu::Sub,
        M::Sbb => Alu::Sbb,
        M::And => Alu::And,
        M::Or => Alu::Or,
        M::Xor => Alu::Xor,
        M::Cmp => Alu::Cmp,
        M::Test => Alu::Test,
        M::Inc | M::Dec if ins.op_count() == 1 => {
            return Some(Inline::IncDec {
                inc: ins.mnemonic() == M::Inc,
                dst,
                wide,
            })
        }
        M::Imul if ins.op_count() == 2 => {
            return Some(Inline::Imul {
                dst,
                src: reg1()?,
                wide,
            })
        }
        _ => return None,
    };
    if ins.op_count() != 2 {
        return None;
    }
    let src = match ins.op1_kind() {
        OpKind::Register => Src::Reg(reg1()?),
        OpKind::Immediate8to32 => Src::Imm(ins.immediate8to32()),
        OpKind::Immediate8to64 => Src::Imm(ins.immediate8to64() as i32),
        OpKind::Immediate32 => Src::Imm(ins.immediate32() as i32),
        OpKind::Immediate32to64 => Src::Imm(ins.immediate32to64() as i32),
        _ => return None,
    };
    Some(Inline::Alu { op, dst, src, wide })
}

/// ALU instructions with one memory operand (see `Inline::AluMem`).
fn classify_alu_mem(ins: &Instruction) -> Option<Inline> {
    let op = match ins.mnemonic() {
        M::Add => Alu::Add,
        M::Sub => Alu::Sub,
        M::And => Alu::And,
        M::Or => Alu::Or,
        M::Xor => Alu::Xor,
        M::Cmp => Alu::Cmp,
        M::Test => Alu::Test,
        _ => return None,
    };
    if ins.op_count() != 2 {
        return None;
    }
    let to_mem = ins.op0_kind() == OpKind::Memory;
    if !to_mem && ins.op1_kind() != OpKind::Memory {
        return None;
    }
    let size = ins.memory_size().size() as i32;
    let other = if to_mem { 1 } else { 0 };
    let src = match ins.op_kind(other) {
        OpKind::Register if size == 4 || size == 8 => Src::Reg(gpr(ins.op_register(other), size == 8)?),
        OpKind::Immediate8 if size == 1 => Src::Imm(ins.immediate8() as i8 as i32),
        OpKind::Immediate8to32 if size == 4 => Src::Imm(ins.immediate8to32()),
        OpKind::Immediate32 if size == 4 => Src::Imm(ins.immediate32() as i32),
        OpKind::Immediate8to64 if size == 8 => Src::Imm(ins.immediate8to64() as i32),
        OpKind::Immediate32to64 if size == 8 => Src::Imm(ins.immediate32to64() as i32),
        _ => return None,
    };
    Some(Inline::AluMem(AluMem {
        op,
        mem: Mem::of(ins)?,
        to_mem,
        src,
        size,
    }))
}

/// Whole-XMM SSE2 moves, integer and bitwise ops and PMOVMSKB (see
/// `SseForm`). Legacy (non-VEX) encodings only.
fn classify_sse(ins: &Instruction) -> Option<Inline> {
    let xmm = |n: u32| {
        let r = ins.op_register(n);
        r.is_xmm().then(|| r.number() & 15)
    };
    // The interpreter's rule for which 16-byte operands must be aligned.
    let aligned = !crate::exec::sse::unaligned_ok(ins.mnemonic());
    let op = match ins.code() {
        Code::Movdqu_xmm_xmmm128
        | Code::Movdqa_xmm_xmmm128
        | Code::Movups_xmm_xmmm128
        | Code::Movaps_xmm_xmmm128
        | Code::Movupd_xmm_xmmm128
        | Code::Movapd_xmm_xmmm128 => None,
        Code::Movdqu_xmmm128_xmm
        | Code::Movdqa_xmmm128_xmm
        | Code::Movups_xmmm128_xmm
        | Code::Movaps_xmmm128_xmm
        | Code::Movupd_xmmm128_xmm
        | Code::Movapd_xmmm128_xmm => {
            let src = xmm(1)?;
            if ins.op0_kind() == OpKind::Memory {
                return Some(Inline::Sse(SseForm::Store {
                    src,
                    mem: Mem::of(ins)?,
                    aligned,
                }));
            }
            return Some(Inline::Sse(SseForm::Load {
                op: None,
                dst: xmm(0)?,
                src: XmmSrc::Reg(src),
            }));
        }
        Code::Pmovmskb_r32_xmm | Code::Pmovmskb_r64_xmm => {
            return Some(Inline::Sse(SseForm::Pmovmskb {
                dst: gpr(ins.op0_register().full_register(), true)?,
                src: xmm(1)?,
            }));
        }
        Code::Pcmpeqb_xmm_xmmm128 => Some(VecOp::Pcmpeqb),
        Code::Pcmpeqw_xmm_xmmm128 => Some(VecOp::Pcmpeqw),
        Code::Pcmpeqd_xmm_xmmm128 => Some(VecOp::Pcmpeqd),
        Code::Pminub_xmm_xmmm128 => Some(VecOp::Pminub),
        Code::Pmaxub_xmm_xmmm128 => Some(VecOp::Pmaxub),
        Code::Pand_xmm_xmmm128 | Code::Andps_xmm_xmmm128 | Code::Andpd_xmm_xmmm128 => Some(VecOp::Pand),
        Code::Pandn_xmm_xmmm128 | Code::Andnps_xmm_xmmm128 | Code::Andnpd_xmm_xmmm128 => Some(VecOp::Pandn),
        Code::Por_xmm_xmmm128 | Code::Orps_xmm_xmmm128 | Code::Orpd_xmm_xmmm128 => Some(VecOp::Por),
        Code::Pxor_xmm_xmmm128 | Code::Xorps_xmm_xmmm128 | Code::Xorpd_xmm_xmmm128 => Some(VecOp::Pxor),
        Code::Paddb_xmm_xmmm128 => Some(VecOp::Paddb),
        Code::Paddw_xmm_xmmm128 => Some(VecOp::Paddw),
        Code::Paddd_xmm_xmmm128 => Some(VecOp::Paddd),
        Code::Paddq_xmm_xmmm128 => Some(VecOp::Paddq),
        Code::Psubb_xmm_xmmm128 => Some(VecOp::Psubb),
        Code::Psubw_xmm_xmmm128 => Some(VecOp::Psubw),
        Code::Psubd_xmm_xmmm128 => Some(VecOp::Psubd),
        Code::Psubq_xmm_xmmm128 => Some(VecOp::Psubq),
        _ => return None,
    };
    let src = match ins.op1_kind() {
        OpKind::Register => XmmSrc::Reg(xmm(1)?),
        OpKind::Memory => XmmSrc::Mem {
            mem: Mem::of(ins)?,
            aligned,
        },
        _ => return None,
    };
    Some(Inline::Sse(SseForm::Load { op, dst: xmm(0)?, src }))
}

/// LEA with a 64-bit address (RIP-relative resolved by the decoder).
fn lea(ins: &Instruction, dst: usize, wide: bool) -> Option<Inline> {
    if ins.op1_kind() != OpKind::Memory {
        return None;
    }
    let base = match ins.memory_base() {
        Register::None | Register::RIP => None,
        r => Some(gpr(r, true)?),
    };
    let index = match ins.memory_index() {
        Register::None => None,
        r => Some((gpr(r, true)?, ins.memory_index_scale().trailing_zeros())),
    };
    Some(Inline::Lea {
        dst,
        base,
        index,
        disp: ins.memory_displacement64(),
        wide,
    })
}

/// Host code for `block`, position-independent, or `None` if the
/// assembler refuses something (the block then stays interpreted).
/// Also returns the offset of the body, where chained jumps enter.
/// `links`: the block's two chain links (`super::Link`).
pub fn block(block: &Block, l: Layout, step: usize, links: usize) -> Option<(Vec<u8>, usize)> {
    let mut a = CodeAssembler::new(64).ok()?;
    let body = emit(&mut a, block, l, step, links).ok()?;
    let r = a
        .assemble_options(0, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .ok()?;
    let offset = r.label_ip(&body).ok()? as usize;
    Some((r.inner.code_buffer, offset))
}

/// The static successors a block can be chained to: the targets of a
/// final direct JMP or Jcc and the fall-through of a Jcc or of a block cut
/// short, if they lie in the block's own page (so that the code-map tag
/// that validated the block covers them) and are not the block itself
/// (that is the self-loop).
pub(crate) fn chain_targets(block: &Block) -> [Option<u64>; 2] {
    let start = block.instrs[0].ins.ip();
    let last = &block.instrs[block.instrs.len() - 1].ins;
    let direct = matches!(last.op0_kind(), OpKind::NearBranch64);
    let (a, b) = match last.flow_control() {
        FlowControl::ConditionalBranch if direct => (Some(last.near_branch64()), Some(last.next_ip())),
        FlowControl::UnconditionalBranch if direct => (Some(last.near_branch64()), None),
        FlowControl::Next => (Some(last.next_ip()), None),
        _ => (None, None),
    };
    let same_page = |t: Option<u64>| t.filter(|&t| t >> 12 == start >> 12 && t != start);
    if (last.next_ip() - 1) >> 12 != start >> 12 {
        return [None, None];
    }
    [same_page(a), same_page(b)]
}

fn emit(a: &mut CodeAssembler, block: &Block, l: Layout, step: usize, links: usize) -> Result<CodeLabel, IcedError> {
    let n = block.instrs.len();
    let mut forms: Vec<Option<Inline>> = block.instrs.iter().map(|d| classify(&d.ins)).collect();
    // A control transfer is inline only as the block's last instruction.
    for f in &mut forms[..n - 1] {
        if f.is_some_and(|f| f.sets_rip()) {
            *f = None;
        }
    }
    // The condition of a final Jcc that the inline instruction just
    // before it evaluates from the host flags it produced (into R8B).
    let fused: Option<ConditionCode> = match (n.checked_sub(2).and_then(|i| forms[i]), forms[n - 1]) {
        (Some(Inline::Alu { .. }), Some(Inline::Branch { cc, .. })) if cc != ConditionCode::None => Some(cc),
        // INC/DEC keep the guest CF, not the host's.
        (Some(Inline::IncDec { .. }), Some(Inline::Branch { cc, .. }))
            if !matches!(
                cc,
                ConditionCode::None | ConditionCode::b | ConditionCode::ae | ConditionCode::be | ConditionCode::a
            ) =>
        {
            Some(cc)
        }
        _ => None,
    };
    // Whether the flags an inline instruction writes can be read: by a
    // later call (which may read them or fault, and a fault pushes them),
    // by a later reader, or after the block.
    let live: Vec<bool> = (0..n)
        .map(|i| {
            for f in &forms[i + 1..] {
                match f {
                    None => return true,
                    Some(f) if f.reads_flags() || f.may_call() => return true,
                    Some(f) if f.writes_all_flags() => return false,
                    _ => {}
                }
            }
            true
        })
        .collect();
    let gp = |r: usize| l.gpr + 8 * r as i32;

    a.push(rbx)?;
    a.push(r12)?;
    a.push(r13)?;
    a.push(r14)?;
    a.push(r15)?;
    a.mov(rbx, rdi)?;
    a.mov(r12, rsi)?;
    a.mov(r13, rdx)?;
    a.xor(r14d, r14d)?;
    a.mov(r15d, MAX_LOOPS as u32)?;
    let mut top = a.create_label();
    let mut done = a.create_label();
    let mut epilogue = a.create_label();
    a.set_label(&mut top)?;
    let mut exits = Vec::new();
    // Out-of-line handler calls of inline memory accesses: (label, index,
    // where to resume).
    let mut slow_paths = Vec::new();
    let call = |a: &mut CodeAssembler, i: usize, exits: &mut Vec<(CodeLabel, usize)>| -> Result<(), IcedError> {
        let d = &block.instrs[i];
        a.mov(rax, d.ins.ip())?;
        a.mov(qword_ptr(r12 + l.rip), rax)?;
        a.mov(rdi, rbx)?;
        a.mov(rsi, d as *const _ as u64)?;
        a.mov(rax, step as u64)?;
        a.call(rax)?;
        a.test(rax, rax)?;
        let exit = a.create_label();
        a.jnz(exit)?;
        exits.push((exit, i + 1));
        Ok(())
    };
    for (i, form) in forms.iter().enumerate() {
        match *form {
            Some(Inline::Load { reg, mem, wide }) | Some(Inline::Store { reg, mem, wide }) => {
                let slow = a.create_label();
                let mut resume = a.create_label();
                let store = matches!(form, Some(Inline::Store { .. }));
                memory(a, l, reg, mem, wide, store, slow)?;
                a.set_label(&mut resume)?;
                slow_paths.push((slow, i, resume));
            }
            Some(Inline::LoadN {
                dst,
                mem: Some(mem),
                kind,
                ..
            }) => {
                let slow = a.create_label();
                let mut resume = a.create_label();
                address(a, l, &gp, mem)?;
                lookup(a, kind.size(), false, slow)?;
                load_n(a, qword_ptr(rdx + rax), l.gpr + dst, kind)?;
                a.set_label(&mut resume)?;
                slow_paths.push((slow, i, resume));
            }
            Some(Inline::LoadN {
                dst,
                mem: None,
                src,
                kind,
            }) => load_n(a, qword_ptr(r12 + (l.gpr + src)), l.gpr + dst, kind)?,
            Some(Inline::StoreN { src, mem, size }) => {
                let slow = a.create_label();
                let mut resume = a.create_label();
                address(a, l, &gp, mem)?;
                lookup(a, size, true, slow)?;
                store_n(a, l, src, size)?;
                a.set_label(&mut resume)?;
                slow_paths.push((slow, i, resume));
            }
            Some(Inline::AluMem(m)) => {
                let slow = a.create_label();
                let mut resume = a.create_label();
                alu_mem(a, l, &gp, m, live[i], slow)?;
                a.set_label(&mut resume)?;
                slow_paths.push((slow, i, resume));
            }
            Some(Inline::Stack(op)) => {
                let slow = a.create_label();
                let mut resume = a.create_label();
                stack(a, l, &gp, op, slow)?;
                a.set_label(&mut resume)?;
                slow_paths.push((slow, i, resume));
            }
            Some(Inline::Sse(f)) => {
                let slow = a.create_label();
                let mut resume = a.create_label();
                sse(a, l, &gp, f, slow)?;
                a.set_label(&mut resume)?;
                slow_paths.push((slow, i, resume));
            }
            Some(Inline::Branch { cc, target, next }) => branch(a, l, cc, target, next, fused.is_some())?,
            Some(f) => inline(a, f, live[i], l, &gp, fused.filter(|_| i + 2 == n))?,
            None => call(a, i, &mut exits)?,
        }
    }
    let last = &block.instrs[n - 1].ins;
    if forms[n - 1].is_some_and(|f| !f.sets_rip()) {
        a.mov(rax, last.next_ip())?;
        a.mov(qword_ptr(r12 + l.rip), rax)?;
    }
    a.add(r14, n as i32)?;
    a.sub(r13, n as i32)?;
    let start = block.instrs[0].ins.ip();
    if branches_home(block) {
        // Loop in host code while the guest loops, within the budget.
        let mut not_home = a.create_label();
        a.mov(rax, start)?;
        a.cmp(qword_ptr(r12 + l.rip), rax)?;
        a.jne(not_home)?;
        a.cmp(r13, n as i32)?;
        a.jb(done)?;
        a.dec(r15)?;
        a.jnz(top)?;
        a.jmp(done)?;
        a.set_label(&mut not_home)?;
        // iced's assembler takes one label per instruction.
        a.nop()?;
    }
    // Chained successors: straight into their code, within the budget and
    // the same bound on passes as the self-loop, so events are looked at
    // as often as the interpreter's chain of blocks looks at them.
    for (k, target) in chain_targets(block).into_iter().enumerate() {
        let Some(target) = target else { continue };
        let mut other = a.create_label();
        a.mov(rax, target)?;
        a.cmp(qword_ptr(r12 + l.rip), rax)?;
        a.jne(other)?;
        a.mov(rcx, (links + k * std::mem::size_of::<super::Link>()) as u64)?;
        a.mov(rax, qword_ptr(rcx + super::Link::BODY))?;
        a.test(rax, rax)?;
        a.jz(done)?;
        a.mov(rdx, qword_ptr(rbx + super::Context::EPOCH))?;
        a.cmp(rdx, qword_ptr(rcx + super::Link::EPOCH))?;
        a.jne(done)?;
        a.cmp(r13, qword_ptr(rcx + super::Link::LEN))?;
        a.jb(done)?;
        a.dec(r15)?;
        a.jz(done)?;
        a.jmp(rax)?;
        a.set_label(&mut other)?;
        a.nop()?;
    }
    a.set_label(&mut done)?;
    a.mov(rax, r14)?;
    a.set_label(&mut epilogue)?;
    a.pop(r15)?;
    a.pop(r14)?;
    a.pop(r13)?;
    a.pop(r12)?;
    a.pop(rbx)?;
    a.ret()?;
    for (mut slow, i, resume) in slow_paths {
        a.set_label(&mut slow)?;
        call(a, i, &mut exits)?;
        a.jmp(resume)?;
    }
    for (mut exit, count) in exits {
        a.set_label(&mut exit)?;
        a.lea(rax, qword_ptr(r14 + count as i32))?;
        a.jmp(epilogue)?;
    }
    Ok(top)
}

/// Whether the block's last instruction is a direct jump or branch to its
/// first: the translated code then loops in host code.
pub(crate) fn branches_home(block: &Block) -> bool {
    let last = &block.instrs[block.instrs.len() - 1].ins;
    matches!(
        last.flow_control(),
        FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch
    ) && matches!(last.op0_kind(), OpKind::NearBranch64)
        && last.near_branch64() == block.instrs[0].ins.ip()
}

/// Merge the host's status flags (`take`; the other written bits are 0)
/// into the guest RFLAGS, replacing `clear`.
fn store_flags(a: &mut CodeAssembler, l: Layout, take: u64, clear: u64) -> Result<(), IcedError> {
    a.pushfq()?;
    a.pop(rax)?;
    a.and(eax, take as i32)?;
    a.mov(rdx, qword_ptr(r12 + l.rflags))?;
    a.and(rdx, !clear as i32)?;
    a.or(rdx, rax)?;
    a.mov(qword_ptr(r12 + l.rflags), rdx)
}

/// Set `r` to whether `cc` holds for the host flags.
fn setcc(a: &mut CodeAssembler, cc: ConditionCode, r: AsmRegister8) -> Result<(), IcedError> {
    use ConditionCode as C;
    match cc {
        C::o => a.seto(r),
        C::no => a.setno(r),
        C::b => a.setb(r),
        C::ae => a.setae(r),
        C::e => a.sete(r),
        C::ne => a.setne(r),
        C::be => a.setbe(r),
        C::a => a.seta(r),
        C::s => a.sets(r),
        C::ns => a.setns(r),
        C::p => a.setp(r),
        C::np => a.setnp(r),
        C::l => a.setl(r),
        C::ge => a.setge(r),
        C::le => a.setle(r),
        C::g => a.setg(r),
        C::None => a.mov(r, 1),
    }
}

/// Set the host ZF to whether `cc` does NOT hold for the guest RFLAGS in
/// the `Cpu` (so "taken" is NZ). Clobbers EAX, EDX.
fn guest_condition(a: &mut CodeAssembler, l: Layout, cc: ConditionCode) -> Result<bool, IcedError> {
    use ConditionCode as C;
    let flags = dword_ptr(r12 + l.rflags);
    let (mask, holds_if_set) = match cc {
        C::o | C::no => (OF, cc == C::o),
        C::b | C::ae => (CF, cc == C::b),
        C::e | C::ne => (ZF, cc == C::e),
        C::be | C::a => (CF | ZF, cc == C::be),
        C::s | C::ns => (SF, cc == C::s),
        C::p | C::np => (PF, cc == C::p),
        C::l | C::ge | C::le | C::g => {
            // SF (bit 7) moved onto OF (bit 11): SF != OF.
            a.mov(eax, flags)?;
            a.mov(edx, eax)?;
            a.shl(edx, 4)?;
            a.xor(edx, eax)?;
            a.and(edx, OF as i32)?;
            if matches!(cc, C::le | C::g) {
                a.and(eax, ZF as i32)?;
                a.or(edx, eax)?;
            }
            return Ok(matches!(cc, C::l | C::le));
        }
        C::None => {
            // Always: ZF clear.
            a.test(esp, esp)?;
            return Ok(true);
        }
    };
    a.test(flags, mask as i32)?;
    Ok(holds_if_set)
}

/// The block's final JMP or Jcc: RIP becomes the target if the condition
/// holds, else the next instruction. `fused`: the instruction before left
/// the condition in R8B.
fn branch(
    a: &mut CodeAssembler,
    l: Layout,
    cc: ConditionCode,
    target: u64,
    next: u64,
    fused: bool,
) -> Result<(), IcedError> {
    if cc == ConditionCode::None {
        a.mov(rax, target)?;
        return a.mov(qword_ptr(r12 + l.rip), rax);
    }
    let taken_if_nz = if fused {
        a.test(r8b, r8b)?;
        true
    } else {
        guest_condition(a, l, cc)?
    };
    a.mov(rax, next)?;
    a.mov(rcx, target)?;
    if taken_if_nz {
        a.cmovne(rax, rcx)?;
    } else {
        a.cmove(rax, rcx)?;
    }
    a.mov(qword_ptr(r12 + l.rip), rax)
}

/// ROL/ROR's CF (bit 0) and OF (bit 11) into `out`, from the rotated
/// value in `value` whose sign is bit `msb`, as `shift_rotate_value` sets
/// them for every count: ROL CF = bit 0, OF = sign XOR CF; ROR CF = sign,
/// OF = sign XOR the bit below. Clobbers `scratch`.
fn rotate_flags(
    a: &mut CodeAssembler,
    rol: bool,
    msb: i32,
    (value, value32): (AsmRegister64, AsmRegister32),
    (out, out32): (AsmRegister64, AsmRegister32),
    (scratch, scratch32): (AsmRegister64, AsmRegister32),
) -> Result<(), IcedError> {
    a.mov(out, value)?;
    a.shr(out, msb)?;
    if rol {
        a.mov(scratch32, value32)?;
        a.and(scratch32, 1)?;
        a.xor(out32, scratch32)?;
        a.shl(out32, 11)?;
        a.or(out32, scratch32)
    } else {
        a.mov(scratch, value)?;
        a.shr(scratch, msb - 1)?;
        a.and(scratch32, 1)?;
        a.xor(scratch32, out32)?;
        a.shl(scratch32, 11)?;
        a.or(out32, scratch32)
    }
}

/// A multiply's guest flags, as the interpreter's `mul_flags` sets them:
/// CF and OF from the multiply just done (the host flags now), SF ZF PF
/// from the low half of the result in `low`, AF clear. Clobbers RAX and
/// RDX (`low` may be RAX: it is tested before RAX is reused).
fn store_mul_flags(
    a: &mut CodeAssembler,
    l: Layout,
    wide: bool,
    low: AsmRegister64,
    low32: AsmRegister32,
) -> Result<(), IcedError> {
    a.pushfq()?;
    a.pop(rdx)?;
    a.and(edx, (CF | OF) as i32)?;
    if wide {
        a.test(low, low)?;
    } else {
        a.test(low32, low32)?;
    }
    a.pushfq()?;
    a.pop(rax)?;
    a.and(eax, (SF | ZF | PF) as i32)?;
    a.or(eax, edx)?;
    a.mov(rdx, qword_ptr(r12 + l.rflags))?;
    a.and(rdx, !STATUS as i32)?;
    a.or(rdx, rax)?;
    a.mov(qword_ptr(r12 + l.rflags), rdx)
}

fn inline(
    a: &mut CodeAssembler,
    f: Inline,
    live: bool,
    l: Layout,
    gp: &dyn Fn(usize) -> i32,
    cc_after: Option<ConditionCode>,
) -> Result<(), IcedError> {
    // Load a guest register into a host register; a 32-bit load
    // zero-extends, so the 64-bit store after a 32-bit op is right.
    let load = |a: &mut CodeAssembler, host64: AsmRegister64, host32: AsmRegister32, r: usize, wide: bool| {
        if wide {
            a.mov(host64, qword_ptr(r12 + gp(r)))
        } else {
            a.mov(host32, dword_ptr(r12 + gp(r)))
        }
    };
    match f {
        // Emitted by `memory`, with a slow path.
        Inline::Load { .. }
        | Inline::Store { .. }
        | Inline::Branch { .. }
        | Inline::Stack(_)
        | Inline::LoadN { .. }
        | Inline::StoreN { .. }
        | Inline::Sse(_)
        | Inline::AluMem(_) => {}
        Inline::MovRR { dst, src, wide } => {
            load(a, rax, eax, src, wide)?;
            a.mov(qword_ptr(r12 + gp(dst)), rax)?;
        }
        Inline::MovRI { dst, value } => {
            a.mov(rax, value)?;
            a.mov(qword_ptr(r12 + gp(dst)), rax)?;
        }
        Inline::Alu { op, dst, src, wide } => {
            load(a, rcx, ecx, dst, wide)?;
            if let Src::Reg(s) = src {
                load(a, rax, eax, s, wide)?;
            }
            if matches!(op, Alu::Adc | Alu::Sbb) {
                a.bt(qword_ptr(r12 + l.rflags), 0)?;
            }
            macro_rules! op {
                ($m:ident) => {
                    match (src, wide) {
                        (Src::Reg(_), true) => a.$m(rcx, rax)?,
                        (Src::Reg(_), false) => a.$m(ecx, eax)?,
                        (Src::Imm(v), true) => a.$m(rcx, v)?,
                        (Src::Imm(v), false) => a.$m(ecx, v)?,
                    }
                };
            }
            match op {
                Alu::Add => op!(add),
                Alu::Adc => op!(adc),
                Alu::Sub => op!(sub),
                Alu::Sbb => op!(sbb),
                Alu::And => op!(and),
                Alu::Or => op!(or),
                Alu::Xor => op!(xor),
                Alu::Cmp => op!(cmp),
                Alu::Test => op!(test),
            }
            if let Some(cc) = cc_after {
                setcc(a, cc, r8b)?;
            }
            if !matches!(op, Alu::Cmp | Alu::Test) {
                a.mov(qword_ptr(r12 + gp(dst)), rcx)?;
            }
            if live {
                // AF is undefined after logic ops; the interpreter (like
                // QEMU) clears it.
                let take = if matches!(op, Alu::And | Alu::Or | Alu::Xor | Alu::Test) {
                    STATUS & !AF
                } else {
                    STATUS
                };
                store_flags(a, l, take, STATUS)?;
            }
        }
        Inline::IncDec { inc, dst, wide } => {
            load(a, rcx, ecx, dst, wide)?;
            match (inc, wide) {
                (true, true) => a.inc(rcx)?,
                (true, false) => a.inc(ecx)?,
                (false, true) => a.dec(rcx)?,
                (false, false) => a.dec(ecx)?,
            }
            if let Some(cc) = cc_after {
                setcc(a, cc, r8b)?;
            }
            a.mov(qword_ptr(r12 + gp(dst)), rcx)?;
            if live {
                store_flags(a, l, STATUS & !CF, STATUS & !CF)?;
            }
        }
        Inline::Imul { dst, src, wide } => {
            load(a, rcx, ecx, dst, wide)?;
            load(a, rax, eax, src, wide)?;
            if wide {
                a.imul_2(rcx, rax)?;
            } else {
                a.imul_2(ecx, eax)?;
            }
            a.mov(qword_ptr(r12 + gp(dst)), rcx)?;
            if live {
                store_mul_flags(a, l, wide, rcx, ecx)?;
            }
        }
        Inline::Shift { op, dst, count, wide } => {
            load(a, rcx, ecx, dst, wide)?;
            if count > 0 {
                let msb = if wide { 63 } else { 31 };
                if live && op == ShiftOp::Shr {
                    // OF: the operand's sign bit, as the interpreter sets it
                    // for every count (hardware defines it for 1 only).
                    a.mov(rdx, rcx)?;
                    a.shr(rdx, msb)?;
                    a.shl(edx, 11)?;
                }
                match (op, wide) {
                    (ShiftOp::Shl, true) => a.shl(rcx, count)?,
                    (ShiftOp::Shl, false) => a.shl(ecx, count)?,
                    (ShiftOp::Shr, true) => a.shr(rcx, count)?,
                    (ShiftOp::Shr, false) => a.shr(ecx, count)?,
                    (ShiftOp::Sar, true) => a.sar(rcx, count)?,
                    (ShiftOp::Sar, false) => a.sar(ecx, count)?,
                    (ShiftOp::Rol, true) => a.rol(rcx, count)?,
                    (ShiftOp::Rol, false) => a.rol(ecx, count)?,
                    (ShiftOp::Ror, true) => a.ror(rcx, count)?,
                    (ShiftOp::Ror, false) => a.ror(ecx, count)?,
                }
                if live && matches!(op, ShiftOp::Rol | ShiftOp::Ror) {
                    rotate_flags(a, op == ShiftOp::Rol, msb, (rcx, ecx), (rax, eax), (rdx, edx))?;
                    a.mov(rdx, qword_ptr(r12 + l.rflags))?;
                    a.and(rdx, !(CF | OF) as i32)?;
                    a.or(rdx, rax)?;
                    a.mov(qword_ptr(r12 + l.rflags), rdx)?;
                } else if live {
                    // CF SF ZF PF from the host; AF clear; OF as the
                    // interpreter's `shift_rotate_value`: SHL the result's
                    // sign bit XOR CF, SHR above, SAR 0.
                    a.pushfq()?;
                    a.pop(rax)?;
                    a.and(eax, (CF | SF | ZF | PF) as i32)?;
                    match op {
                        ShiftOp::Shl => {
                            a.mov(rdx, rcx)?;
                            a.shr(rdx, msb)?;
                            a.xor(edx, eax)?;
                            a.and(edx, 1)?;
                            a.shl(edx, 11)?;
                            a.or(eax, edx)?;
                        }
                        ShiftOp::Shr => a.or(eax, edx)?,
                        _ => {}
                    }
                    a.mov(rdx, qword_ptr(r12 + l.rflags))?;
                    a.and(rdx, !STATUS as i32)?;
                    a.or(rdx, rax)?;
                    a.mov(qword_ptr(r12 + l.rflags), rdx)?;
                }
            }
            // A zero count leaves the flags but still writes the
            // (zero-extended) register, as the interpreter does.
            a.mov(qword_ptr(r12 + gp(dst)), rcx)?;
        }
        Inline::ShiftCl { op, dst, wide } => {
            let msb = if wide { 63 } else { 31 };
            a.mov(ecx, dword_ptr(r12 + gp(1)))?;
            load(a, rax, eax, dst, wide)?;
            if live && op == ShiftOp::Shr {
                // OF: the operand's sign bit (see `Inline::Shift`).
                a.mov(r8, rax)?;
                a.shr(r8, msb)?;
                a.shl(r8d, 11)?;
            }
            // The host masks the count as the guest does (31 or 63).
            match (op, wide) {
                (ShiftOp::Shl, true) => a.shl(rax, cl)?,
                (ShiftOp::Shl, false) => a.shl(eax, cl)?,
                (ShiftOp::Shr, true) => a.shr(rax, cl)?,
                (ShiftOp::Shr, false) => a.shr(eax, cl)?,
                (ShiftOp::Sar, true) => a.sar(rax, cl)?,
                (ShiftOp::Sar, false) => a.sar(eax, cl)?,
                (ShiftOp::Rol, true) => a.rol(rax, cl)?,
                (ShiftOp::Rol, false) => a.rol(eax, cl)?,
                (ShiftOp::Ror, true) => a.ror(rax, cl)?,
                (ShiftOp::Ror, false) => a.ror(eax, cl)?,
            }
            // A zero count still writes the (zero-extended) register.
            a.mov(qword_ptr(r12 + gp(dst)), rax)?;
            if live {
                a.pushfq()?;
                a.pop(rdx)?;
                let mut skip = a.create_label();
                // A zero count keeps the flags.
                a.and(ecx, msb)?;
                a.jz(skip)?;
                // The new status bits into EDX, the bits they replace into ECX.
                match op {
                    ShiftOp::Rol | ShiftOp::Ror => {
                        rotate_flags(a, op == ShiftOp::Rol, msb, (rax, eax), (rdx, edx), (r8, r8d))?;
                        a.mov(ecx, (CF | OF) as u32)?;
                    }
                    _ => {
                        // CF SF ZF PF from the host; AF clear; OF: SHL the
                        // result's sign XOR CF, SHR the operand's sign, SAR 0.
                        a.and(edx, (CF | SF | ZF | PF) as i32)?;
                        match op {
                            ShiftOp::Shl => {
                                a.shr(rax, msb)?;
                                a.xor(eax, edx)?;
                                a.and(eax, 1)?;
                                a.shl(eax, 11)?;
                                a.or(edx, eax)?;
                            }
                            ShiftOp::Shr => a.or(edx, r8d)?,
                            _ => {}
                        }
                        a.mov(ecx, STATUS as u32)?;
                    }
                }
                a.not(rcx)?;
                a.and(rcx, qword_ptr(r12 + l.rflags))?;
                a.or(rcx, rdx)?;
                a.mov(qword_ptr(r12 + l.rflags), rcx)?;
                a.set_label(&mut skip)?;
                a.nop()?;
            }
        }
        Inline::NegNot { neg, dst, wide } => {
            load(a, rcx, ecx, dst, wide)?;
            match (neg, wide) {
                (true, true) => a.neg(rcx)?,
                (true, false) => a.neg(ecx)?,
                (false, true) => a.not(rcx)?,
                (false, false) => a.not(ecx)?,
            }
            a.mov(qword_ptr(r12 + gp(dst)), rcx)?;
            if live && neg {
                // The flags of 0 - the operand, as the interpreter's SUB.
                store_flags(a, l, STATUS, STATUS)?;
            }
        }
        Inline::MulAcc { signed, src, wide } => {
            load(a, rax, eax, 0, wide)?;
            load(a, rcx, ecx, src, wide)?;
            match (signed, wide) {
                (false, true) => a.mul(rcx)?,
                (false, false) => a.mul(ecx)?,
                (true, true) => a.imul(rcx)?,
                (true, false) => a.imul(ecx)?,
            }
            // A 32-bit multiply zero-extends EAX and EDX, as the
            // interpreter's register writes do.
            a.mov(qword_ptr(r12 + gp(0)), rax)?;
            a.mov(qword_ptr(r12 + gp(2)), rdx)?;
            if live {
                store_mul_flags(a, l, wide, rax, eax)?;
            }
        }
        Inline::DoubleShift {
            left,
            dst,
            src,
            count,
            wide,
        } => {
            load(a, rax, eax, dst, wide)?;
            if count == Some(0) {
                // Only the (zero-extended) register write, as
                // `double_shift_value` with a zero count.
                return a.mov(qword_ptr(r12 + gp(dst)), rax);
            }
            load(a, rdx, edx, src, wide)?;
            a.mov(r8, rax)?;
            macro_rules! shift {
                ($c:expr) => {
                    match (left, wide) {
                        (true, true) => a.shld(rax, rdx, $c)?,
                        (true, false) => a.shld(eax, edx, $c)?,
                        (false, true) => a.shrd(rax, rdx, $c)?,
                        (false, false) => a.shrd(eax, edx, $c)?,
                    }
                };
            }
            // The host masks a CL count as the guest does (31 or 63).
            match count {
                Some(c) => shift!(c),
                None => {
                    a.mov(ecx, dword_ptr(r12 + gp(1)))?;
                    shift!(cl)
                }
            }
            a.mov(qword_ptr(r12 + gp(dst)), rax)?;
            if live {
                // CF SF ZF PF from the host; AF clear; OF = the sign bit
                // changed, as the interpreter sets it for every count.
                a.pushfq()?;
                a.pop(rdx)?;
                let mut skip = a.create_label();
                if count.is_none() {
                    // A zero count keeps the flags.
                    a.and(ecx, if wide { 63 } else { 31 })?;
                    a.jz(skip)?;
                }
                a.and(edx, (CF | SF | ZF | PF) as i32)?;
                a.xor(r8, rax)?;
                a.shr(r8, if wide { 63 } else { 31 })?;
                a.shl(r8d, 11)?;
                a.or(edx, r8d)?;
                a.mov(rax, qword_ptr(r12 + l.rflags))?;
                a.and(rax, !STATUS as i32)?;
                a.or(rax, rdx)?;
                a.mov(qword_ptr(r12 + l.rflags), rax)?;
                if count.is_none() {
                    a.set_label(&mut skip)?;
                    a.nop()?;
                }
            }
        }
        Inline::Setcc { cc, dst } => {
            if guest_condition(a, l, cc)? {
                a.setne(cl)?;
            } else {
                a.sete(cl)?;
            }
            a.mov(byte_ptr(r12 + (l.gpr + dst)), cl)?;
        }
        Inline::Cmov { cc, dst, src, wide } => {
            // A 32-bit destination is zero-extended even when not moved.
            let taken_if_nz = guest_condition(a, l, cc)?;
            load(a, rax, eax, dst, wide)?;
            load(a, rcx, ecx, src, wide)?;
            if taken_if_nz {
                a.cmovne(rax, rcx)?;
            } else {
                a.cmove(rax, rcx)?;
            }
            a.mov(qword_ptr(r12 + gp(dst)), rax)?;
        }
        Inline::Lea {
            dst,
            base,
            index,
            disp,
            wide,
        } => {
            a.mov(rax, disp)?;
            if let Some(b) = base {
                a.add(rax, qword_ptr(r12 + gp(b)))?;
            }
            if let Some((x, shift)) = index {
                a.mov(rcx, qword_ptr(r12 + gp(x)))?;
                if shift > 0 {
                    a.shl(rcx, shift)?;
                }
                a.add(rax, rcx)?;
            }
            if !wide {
                a.mov(eax, eax)?;
            }
            a.mov(qword_ptr(r12 + gp(dst)), rax)?;
        }
    }
    Ok(())
}

/// Compute a memory operand's address into RAX.
fn address(a: &mut CodeAssembler, l: Layout, gp: &dyn Fn(usize) -> i32, m: Mem) -> Result<(), IcedError> {
    a.mov(rax, m.disp)?;
    if let Some(b) = m.base {
        a.add(rax, qword_ptr(r12 + gp(b)))?;
    }
    if let Some((x, shift)) = m.index {
        a.mov(rcx, qword_ptr(r12 + gp(x)))?;
        if shift > 0 {
            a.shl(rcx, shift)?;
        }
        a.add(rax, rcx)?;
    }
    if let Some(seg) = m.seg {
        let base =
            l.segs + (seg as usize * std::mem::size_of::<Segment>() + std::mem::offset_of!(Segment, base)) as i32;
        a.add(rax, qword_ptr(r12 + base))?;
    }
    Ok(())
}

/// An inline 4- or 8-byte load or store of guest register `reg`: the
/// data-TLB set from the context, the entry for the page, the tag, the
/// host pointer; a store also checks the page holds no code. Anything
/// else jumps to `slow`.
fn memory(
    a: &mut CodeAssembler,
    l: Layout,
    reg: usize,
    m: Mem,
    wide: bool,
    store: bool,
    slow: CodeLabel,
) -> Result<(), IcedError> {
    let gp = |r: usize| l.gpr + 8 * r as i32;
    address(a, l, &gp, m)?;
    lookup(a, if wide { 8 } else { 4 }, store, slow)?;
    match (store, wide) {
        (false, true) => {
            a.mov(rcx, qword_ptr(rdx + rax))?;
            a.mov(qword_ptr(r12 + gp(reg)), rcx)?;
        }
        (false, false) => {
            a.mov(ecx, dword_ptr(rdx + rax))?;
            a.mov(qword_ptr(r12 + gp(reg)), rcx)?;
        }
        (true, true) => {
            a.mov(rcx, qword_ptr(r12 + gp(reg)))?;
            a.mov(qword_ptr(rdx + rax), rcx)?;
        }
        (true, false) => {
            a.mov(ecx, dword_ptr(r12 + gp(reg)))?;
            a.mov(dword_ptr(rdx + rax), ecx)?;
        }
    }
    Ok(())
}

/// The inline data-TLB lookup of a `size`-byte access at the address in
/// RAX: the data-TLB set from the context, the entry for the page, the
/// tag, the host pointer; a store also checks the page holds no code.
/// Anything else (a miss, MMIO, a page crossing, a code page) jumps to
/// `slow`. On a hit the host address is RDX + RAX. Clobbers RCX, R8.
fn lookup(a: &mut CodeAssembler, size: i32, store: bool, slow: CodeLabel) -> Result<(), IcedError> {
    use crate::mmu::JitTlb;
    // Within one page.
    a.mov(ecx, eax)?;
    a.and(ecx, 0xfff)?;
    a.cmp(ecx, 0x1000 - size)?;
    a.ja(slow)?;
    a.mov(rdx, qword_ptr(rbx + super::Context::DTLB))?;
    a.test(rdx, rdx)?;
    a.jz(slow)?;
    a.mov(rcx, rax)?;
    a.shr(rcx, 12)?;
    a.and(ecx, JitTlb::INDEX_MASK as i32)?;
    a.imul_3(rcx, rcx, JitTlb::ENTRY_SIZE)?;
    a.add(rdx, rcx)?;
    a.mov(rcx, rax)?;
    a.and(rcx, -4096)?;
    let tag = if store { JitTlb::WRITE_TAG } else { JitTlb::READ_TAG };
    a.cmp(rcx, qword_ptr(rdx + tag))?;
    a.jne(slow)?;
    if store {
        // A page with code goes through the handler, which invalidates it.
        a.mov(rcx, qword_ptr(rdx + JitTlb::PHYS))?;
        a.shr(rcx, 12)?;
        a.cmp(rcx, qword_ptr(rbx + super::Context::CODE_MAP_LEN))?;
        a.jae(slow)?;
        a.mov(r8, qword_ptr(rbx + super::Context::CODE_MAP))?;
        a.test(byte_ptr(r8 + rcx * 4), 1)?;
        a.jnz(slow)?;
    }
    a.mov(rdx, qword_ptr(rdx + JitTlb::HOST))?;
    a.test(rdx, rdx)?;
    a.jz(slow)?;
    a.and(eax, 0xfff)?;
    Ok(())
}

/// PUSH, POP, CALL or RET through the inline TLB lookup (see
/// `Inline::Stack`); RSP and RIP change only after the access.
fn stack(
    a: &mut CodeAssembler,
    l: Layout,
    gp: &dyn Fn(usize) -> i32,
    op: StackOp,
    slow: CodeLabel,
) -> Result<(), IcedError> {
    let guest_rsp = qword_ptr(r12 + gp(4));
    a.mov(rax, guest_rsp)?;
    match op {
        StackOp::Push(reg) => {
            a.sub(rax, 8)?;
            lookup(a, 8, true, slow)?;
            // PUSH RSP pushes the old value.
            a.mov(rcx, qword_ptr(r12 + gp(reg)))?;
            a.mov(qword_ptr(rdx + rax), rcx)?;
            a.sub(guest_rsp, 8)?;
        }
        StackOp::Call { target, next } => {
            a.sub(rax, 8)?;
            lookup(a, 8, true, slow)?;
            a.mov(rcx, next)?;
            a.mov(qword_ptr(rdx + rax), rcx)?;
            a.sub(guest_rsp, 8)?;
            a.mov(rax, target)?;
            a.mov(qword_ptr(r12 + l.rip), rax)?;
        }
        StackOp::Pop(reg) => {
            lookup(a, 8, false, slow)?;
            a.mov(rcx, qword_ptr(rdx + rax))?;
            // POP RSP: the loaded value wins over the increment.
            a.add(guest_rsp, 8)?;
            a.mov(qword_ptr(r12 + gp(reg)), rcx)?;
        }
        StackOp::Ret => {
            lookup(a, 8, false, slow)?;
            a.mov(rcx, qword_ptr(rdx + rax))?;
            // A non-canonical return address: the handler raises #GP.
            a.mov(rax, rcx)?;
            a.shl(rax, 16)?;
            a.sar(rax, 16)?;
            a.cmp(rax, rcx)?;
            a.jne(slow)?;
            a.mov(qword_ptr(r12 + l.rip), rcx)?;
            a.add(guest_rsp, 8)?;
        }
    }
    Ok(())
}

/// An SSE form (see `SseForm`): the checks the handler makes
/// before anything else (SSE on, then the memory operand's alignment and
/// the inline lookup), each jumping to `slow`, then the host instruction
/// on the guest XMM registers in the `Cpu`. Uses XMM0, XMM1 (caller-saved,
/// nothing of the VMM lives in them across the call into the block).
fn sse(
    a: &mut CodeAssembler,
    l: Layout,
    gp: &dyn Fn(usize) -> i32,
    f: SseForm,
    slow: CodeLabel,
) -> Result<(), IcedError> {
    use crate::state::cr;
    let xmm = |r: usize| xmmword_ptr(r12 + (l.xmm + 16 * r as i32));
    // #UD without OS support or with emulation on, #NM while TS is set.
    a.mov(rcx, qword_ptr(r12 + l.cr0))?;
    a.test(ecx, (cr::CR0_EM | cr::CR0_TS) as i32)?;
    a.jnz(slow)?;
    a.mov(rcx, qword_ptr(r12 + l.cr4))?;
    a.test(ecx, cr::CR4_OSFXSR as i32)?;
    a.jz(slow)?;
    // The 16 bytes at `mem`: host address RDX + RAX.
    let guest_memory = |a: &mut CodeAssembler, mem: Mem, aligned: bool, store: bool| -> Result<(), IcedError> {
        address(a, l, gp, mem)?;
        if aligned {
            a.test(al, 15)?;
            a.jnz(slow)?;
        }
        lookup(a, 16, store, slow)
    };
    match f {
        SseForm::Load { op, dst, src } => {
            match src {
                XmmSrc::Reg(r) => a.movdqu(xmm1, xmm(r))?,
                XmmSrc::Mem { mem, aligned } => {
                    guest_memory(a, mem, aligned, false)?;
                    a.movdqu(xmm1, xmmword_ptr(rdx + rax))?;
                }
            }
            let Some(op) = op else {
                return a.movdqu(xmm(dst), xmm1);
            };
            a.movdqu(xmm0, xmm(dst))?;
            match op {
                VecOp::Pcmpeqb => a.pcmpeqb(xmm0, xmm1)?,
                VecOp::Pcmpeqw => a.pcmpeqw(xmm0, xmm1)?,
                VecOp::Pcmpeqd => a.pcmpeqd(xmm0, xmm1)?,
                VecOp::Pminub => a.pminub(xmm0, xmm1)?,
                VecOp::Pmaxub => a.pmaxub(xmm0, xmm1)?,
                VecOp::Pand => a.pand(xmm0, xmm1)?,
                VecOp::Pandn => a.pandn(xmm0, xmm1)?,
                VecOp::Por => a.por(xmm0, xmm1)?,
                VecOp::Pxor => a.pxor(xmm0, xmm1)?,
                VecOp::Paddb => a.paddb(xmm0, xmm1)?,
                VecOp::Paddw => a.paddw(xmm0, xmm1)?,
                VecOp::Paddd => a.paddd(xmm0, xmm1)?,
                VecOp::Paddq => a.paddq(xmm0, xmm1)?,
                VecOp::Psubb => a.psubb(xmm0, xmm1)?,
                VecOp::Psubw => a.psubw(xmm0, xmm1)?,
                VecOp::Psubd => a.psubd(xmm0, xmm1)?,
                VecOp::Psubq => a.psubq(xmm0, xmm1)?,
            }
            a.movdqu(xmm(dst), xmm0)
        }
        SseForm::Store { src, mem, aligned } => {
            guest_memory(a, mem, aligned, true)?;
            a.movdqu(xmm0, xmm(src))?;
            a.movdqu(xmmword_ptr(rdx + rax), xmm0)
        }
        SseForm::Pmovmskb { dst, src } => {
            a.movdqu(xmm0, xmm(src))?;
            a.pmovmskb(eax, xmm0)?;
            a.mov(qword_ptr(r12 + gp(dst)), rax)
        }
    }
}

impl LoadKind {
    fn size(self) -> i32 {
        match self {
            LoadKind::Zero(n) | LoadKind::Sign(n, _) | LoadKind::Merge(n) => n as i32,
        }
    }
}

/// Load `kind`'s operand from `from` (its size is the kind's) and write
/// it to the guest register bytes at `dst` from the `Cpu`. Uses RCX.
fn load_n(a: &mut CodeAssembler, from: AsmMemoryOperand, dst: i32, kind: LoadKind) -> Result<(), IcedError> {
    match kind {
        LoadKind::Zero(1) => a.movzx(ecx, byte_ptr(from))?,
        LoadKind::Zero(_) => a.movzx(ecx, word_ptr(from))?,
        LoadKind::Sign(1, false) => a.movsx(ecx, byte_ptr(from))?,
        LoadKind::Sign(1, true) => a.movsx(rcx, byte_ptr(from))?,
        LoadKind::Sign(2, false) => a.movsx(ecx, word_ptr(from))?,
        LoadKind::Sign(2, true) => a.movsx(rcx, word_ptr(from))?,
        LoadKind::Sign(_, _) => a.movsxd(rcx, dword_ptr(from))?,
        LoadKind::Merge(1) => {
            a.mov(cl, byte_ptr(from))?;
            return a.mov(byte_ptr(r12 + dst), cl);
        }
        LoadKind::Merge(_) => {
            a.mov(cx, word_ptr(from))?;
            return a.mov(word_ptr(r12 + dst), cx);
        }
    }
    a.mov(qword_ptr(r12 + dst), rcx)
}

/// The value of a MOV [mem], r8/r16/imm into the host address RDX + RAX.
fn store_n(a: &mut CodeAssembler, l: Layout, src: StoreSrc, size: i32) -> Result<(), IcedError> {
    let to = qword_ptr(rdx + rax);
    match (src, size) {
        (StoreSrc::Reg(r), 1) => {
            a.mov(cl, byte_ptr(r12 + (l.gpr + r)))?;
            a.mov(byte_ptr(to), cl)
        }
        (StoreSrc::Reg(r), _) => {
            a.mov(cx, word_ptr(r12 + (l.gpr + r)))?;
            a.mov(word_ptr(to), cx)
        }
        (StoreSrc::Imm(v), 1) => a.mov(byte_ptr(to), v),
        (StoreSrc::Imm(v), 2) => a.mov(word_ptr(to), v),
        (StoreSrc::Imm(v), 4) => a.mov(dword_ptr(to), v),
        (StoreSrc::Imm(v), _) => a.mov(qword_ptr(to), v),
    }
}

/// An ALU instruction with a memory operand (see `Inline::AluMem`).
fn alu_mem(
    a: &mut CodeAssembler,
    l: Layout,
    gp: &dyn Fn(usize) -> i32,
    m: AluMem,
    live: bool,
    slow: CodeLabel,
) -> Result<(), IcedError> {
    let writes = !matches!(m.op, Alu::Cmp | Alu::Test);
    address(a, l, gp, m.mem)?;
    lookup(a, m.size, m.to_mem && writes, slow)?;
    let at = qword_ptr(rdx + rax);
    let at = match m.size {
        1 => byte_ptr(at),
        4 => dword_ptr(at),
        _ => at,
    };
    // The register operand (source, or destination of `op r, [m]`).
    match (m.src, m.size) {
        (Src::Reg(r), 4) => a.mov(ecx, dword_ptr(r12 + gp(r)))?,
        (Src::Reg(r), _) => a.mov(rcx, qword_ptr(r12 + gp(r)))?,
        _ => {}
    }
    macro_rules! op {
        ($m:ident) => {
            match (m.to_mem, m.src, m.size) {
                (true, Src::Imm(v), _) => a.$m(at, v)?,
                (true, Src::Reg(_), 4) => a.$m(at, ecx)?,
                (true, Src::Reg(_), _) => a.$m(at, rcx)?,
                (false, _, 4) => a.$m(ecx, at)?,
                (false, _, _) => a.$m(rcx, at)?,
            }
        };
    }
    match m.op {
        Alu::Add => op!(add),
        Alu::Sub => op!(sub),
        Alu::And => op!(and),
        Alu::Or => op!(or),
        Alu::Xor => op!(xor),
        Alu::Cmp => op!(cmp),
        // TEST has only the `test r/m, r` form: the operands commute.
        Alu::Test => match (m.src, m.size) {
            (Src::Imm(v), _) => a.test(at, v)?,
            (Src::Reg(_), 4) => a.test(at, ecx)?,
            (Src::Reg(_), _) => a.test(at, rcx)?,
        },
        Alu::Adc | Alu::Sbb => unreachable!("not classified"),
    }
    if !m.to_mem && writes {
        let Src::Reg(r) = m.src else {
            unreachable!("op r, [m] has a register")
        };
        a.mov(qword_ptr(r12 + gp(r)), rcx)?;
    }
    if live {
        let take = if matches!(m.op, Alu::And | Alu::Or | Alu::Xor | Alu::Test) {
            STATUS & !AF
        } else {
            STATUS
        };
        store_flags(a, l, take, STATUS)?;
    }
    Ok(())
}
