//! Differential tests for exec/alu.rs: every integer arithmetic/logic
//! instruction the 64-bit host can run, in every operand size, with
//! register, memory, immediate and LOCK forms, random flags and edge values.
//! (The BCD instructions are invalid in 64-bit mode; they have unit tests in
//! src/exec/alu.rs.)

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use x86emu::state::flags::{AF, CF, OF, PF, SF, STATUS, ZF};

use crate::harness::*;

/// Operand forms. R = register, M = memory, I = immediate (I8 = imm8
/// sign-extended), Lock = LOCK prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    RR,
    RM,
    MR,
    RI8,
    RI,
    MI8,
    MI,
    LockMR,
    LockMI,
    R,
    M,
    LockM,
}

impl Form {
    fn name(self) -> &'static str {
        match self {
            Form::RR => "r,r",
            Form::RM => "r,m",
            Form::MR => "m,r",
            Form::RI8 => "r,imm8",
            Form::RI => "r,imm",
            Form::MI8 => "m,imm8",
            Form::MI => "m,imm",
            Form::LockMR => "lock m,r",
            Form::LockMI => "lock m,imm",
            Form::R => "r",
            Form::M => "m",
            Form::LockM => "lock m",
        }
    }
    fn has_mem(self) -> bool {
        !matches!(self, Form::RR | Form::RI8 | Form::RI | Form::R)
    }
    fn locked(self) -> bool {
        matches!(self, Form::LockMR | Form::LockMI | Form::LockM)
    }
    fn imm8(self) -> bool {
        matches!(self, Form::RI8 | Form::MI8)
    }
}

const R64: [AsmRegister64; 16] = [
    rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];
const R32: [AsmRegister32; 16] = [
    eax, ecx, edx, ebx, esp, ebp, esi, edi, r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d,
];
const R16: [AsmRegister16; 16] = [
    ax, cx, dx, bx, sp, bp, si, di, r8w, r9w, r10w, r11w, r12w, r13w, r14w, r15w,
];
/// 8-bit registers by id: 0..15 as with REX (SPL..DIL), 16..19 = AH CH DH BH.
const R8X: [AsmRegister8; 20] = [
    al, cl, dl, bl, spl, bpl, sil, dil, r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b, ah, ch, dh, bh,
];

/// The registers an instruction uses, and its memory operand.
#[derive(Clone, Copy, Debug)]
struct Regs {
    d: usize,
    s: usize,
    base: usize,
    /// Offset of the memory operand in the scratch page.
    off: u64,
    /// Displacement encoded in the instruction.
    disp: i32,
}

impl Regs {
    fn mem(&self) -> AsmMemoryOperand {
        R64[self.base] + self.disp
    }
}

const MUL_UNDEF: u64 = SF | ZF | AF | PF;
const DIV_UNDEF: u64 = STATUS;

/// A random register id for `size`, avoiding RSP and `avoid`. With
/// `legacy8`, 8-bit ids come from AL..BL and AH..BH (no REX).
fn pick_reg(rng: &mut Rng, size: u32, legacy8: bool, avoid: &[usize]) -> usize {
    loop {
        let id = if size == 1 && legacy8 {
            [0, 1, 2, 3, 16, 17, 18, 19][rng.below(8) as usize]
        } else {
            rng.below(16) as usize
        };
        if id != 4 && !avoid.contains(&id) {
            return id;
        }
    }
}

/// Value of register id `id` (low `size` bytes).
fn reg_val(g: &[u64; 16], id: usize, size: u32) -> u64 {
    if id >= 16 {
        (g[id - 16] >> 8) & 0xff
    } else {
        g[id] & mask(size)
    }
}

fn set_reg_val(g: &mut [u64; 16], id: usize, size: u32, v: u64) {
    if id >= 16 {
        g[id - 16] = (g[id - 16] & !0xff00) | ((v & 0xff) << 8);
    } else {
        g[id] = (g[id] & !mask(size)) | (v & mask(size));
    }
}

fn mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// A random start: edgy registers and memory, random status flags, and the
/// registers and memory operand of a `size`-byte `form`. `align` forces the
/// memory operand's alignment (LOCK forms are aligned so the native run
/// never takes a split lock).
fn setup(rng: &mut Rng, size: u32, form: Form, align: u64, avoid: &[usize]) -> (Case, Regs) {
    let mut c = Case::new(Vec::new());
    for v in c.gpr.iter_mut() {
        *v = rng.edgy();
    }
    for b in c.mem.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    c.rflags = rng.next_u64() & STATUS;
    let legacy8 = size == 1 && rng.below(2) == 0;
    let d = pick_reg(rng, size, legacy8, avoid);
    let s = pick_reg(rng, size, legacy8, avoid);
    // Bases: never RAX/RDX (implicit operands of MUL/DIV/CMPXCHG); without
    // REX only the legacy registers.
    let base = if legacy8 {
        [1, 3, 5, 6, 7][rng.below(5) as usize]
    } else {
        [1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15][rng.below(13) as usize]
    };
    let align = if form.locked() { align.max(size as u64) } else { align };
    let off = rng.below(0xb00) & !(align - 1);
    let disp = if rng.below(4) == 0 {
        0
    } else {
        rng.below(off.min(0x200) + 1) as i32
    };
    c.gpr[base] = scratch_addr() + off - disp as u64;
    if form.has_mem() {
        let v = rng.edgy().to_le_bytes();
        c.mem[off as usize..off as usize + size as usize].copy_from_slice(&v[..size as usize]);
    }
    (c, Regs { d, s, base, off, disp })
}

/// An immediate for `size`: imm8 forms a sign-extended byte, others a
/// value of the operand size (32 bits at most), biased to edges.
fn pick_imm(rng: &mut Rng, size: u32, form: Form) -> i32 {
    let v = rng.edgy();
    match (size, form.imm8()) {
        (1, _) | (_, true) => v as i8 as i32,
        (2, _) => v as i16 as i32,
        _ => v as i32,
    }
}

fn assemble(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    asm(f)
}

/// RM emitter helper: TEST has no r,m encoding, so it swaps to m,r.
macro_rules! rm {
    (yes, $a:ident, $op:ident, $r:expr, $m:expr) => {
        $a.$op($r, $m)
    };
    (no, $a:ident, $op:ident, $r:expr, $m:expr) => {
        $a.$op($m, $r)
    };
}

/// An emitter for a two-operand ALU instruction in every form and size.
macro_rules! binop_emitter {
    ($name:ident, $op:ident, $rm:tt) => {
        fn $name(a: &mut CodeAssembler, f: Form, size: u32, r: Regs, imm: i32) -> Result<(), IcedError> {
            let (d, s, m) = (r.d, r.s, r.mem());
            match (size, f) {
                (8, Form::RR) => a.$op(R64[d], R64[s]),
                (8, Form::RM) => rm!($rm, a, $op, R64[d], qword_ptr(m)),
                (8, Form::MR) => a.$op(qword_ptr(m), R64[s]),
                (8, Form::LockMR) => a.lock().$op(qword_ptr(m), R64[s]),
                (8, Form::RI | Form::RI8) => a.$op(R64[d], imm),
                (8, Form::MI | Form::MI8) => a.$op(qword_ptr(m), imm),
                (8, _) => a.lock().$op(qword_ptr(m), imm),
                (4, Form::RR) => a.$op(R32[d], R32[s]),
                (4, Form::RM) => rm!($rm, a, $op, R32[d], dword_ptr(m)),
                (4, Form::MR) => a.$op(dword_ptr(m), R32[s]),
                (4, Form::LockMR) => a.lock().$op(dword_ptr(m), R32[s]),
                (4, Form::RI | Form::RI8) => a.$op(R32[d], imm),
                (4, Form::MI | Form::MI8) => a.$op(dword_ptr(m), imm),
                (4, _) => a.lock().$op(dword_ptr(m), imm),
                (2, Form::RR) => a.$op(R16[d], R16[s]),
                (2, Form::RM) => rm!($rm, a, $op, R16[d], word_ptr(m)),
                (2, Form::MR) => a.$op(word_ptr(m), R16[s]),
                (2, Form::LockMR) => a.lock().$op(word_ptr(m), R16[s]),
                (2, Form::RI | Form::RI8) => a.$op(R16[d], imm),
                (2, Form::MI | Form::MI8) => a.$op(word_ptr(m), imm),
                (2, _) => a.lock().$op(word_ptr(m), imm),
                (_, Form::RR) => a.$op(R8X[d], R8X[s]),
                (_, Form::RM) => rm!($rm, a, $op, R8X[d], byte_ptr(m)),
                (_, Form::MR) => a.$op(byte_ptr(m), R8X[s]),
                (_, Form::LockMR) => a.lock().$op(byte_ptr(m), R8X[s]),
                (_, Form::RI | Form::RI8) => a.$op(R8X[d], imm),
                (_, Form::MI | Form::MI8) => a.$op(byte_ptr(m), imm),
                (_, _) => a.lock().$op(byte_ptr(m), imm),
            }
        }
    };
}

binop_emitter!(emit_add, add, yes);
binop_emitter!(emit_adc, adc, yes);
binop_emitter!(emit_sub, sub, yes);
binop_emitter!(emit_sbb, sbb, yes);
binop_emitter!(emit_and, and, yes);
binop_emitter!(emit_or, or, yes);
binop_emitter!(emit_xor, xor, yes);
binop_emitter!(emit_cmp, cmp, yes);
binop_emitter!(emit_test, test, no);

/// An emitter for a one-operand instruction (R, M, LockM).
macro_rules! unop_emitter {
    ($name:ident, $op:ident) => {
        fn $name(a: &mut CodeAssembler, f: Form, size: u32, r: Regs, _imm: i32) -> Result<(), IcedError> {
            let (d, m) = (r.d, r.mem());
            match (size, f) {
                (8, Form::R) => a.$op(R64[d]),
                (8, Form::M) => a.$op(qword_ptr(m)),
                (8, _) => a.lock().$op(qword_ptr(m)),
                (4, Form::R) => a.$op(R32[d]),
                (4, Form::M) => a.$op(dword_ptr(m)),
                (4, _) => a.lock().$op(dword_ptr(m)),
                (2, Form::R) => a.$op(R16[d]),
                (2, Form::M) => a.$op(word_ptr(m)),
                (2, _) => a.lock().$op(word_ptr(m)),
                (_, Form::R) => a.$op(R8X[d]),
                (_, Form::M) => a.$op(byte_ptr(m)),
                (_, _) => a.lock().$op(byte_ptr(m)),
            }
        }
    };
}

unop_emitter!(emit_inc, inc);
unop_emitter!(emit_dec, dec);
unop_emitter!(emit_neg, neg);
unop_emitter!(emit_not, not);
unop_emitter!(emit_mul, mul);
unop_emitter!(emit_imul1, imul);
unop_emitter!(emit_div, div);
unop_emitter!(emit_idiv, idiv);

/// XADD and CMPXCHG: r,r / m,r / lock m,r.
macro_rules! xop_emitter {
    ($name:ident, $op:ident) => {
        fn $name(a: &mut CodeAssembler, f: Form, size: u32, r: Regs, _imm: i32) -> Result<(), IcedError> {
            let (d, s, m) = (r.d, r.s, r.mem());
            match (size, f) {
                (8, Form::RR) => a.$op(R64[d], R64[s]),
                (8, Form::MR) => a.$op(qword_ptr(m), R64[s]),
                (8, _) => a.lock().$op(qword_ptr(m), R64[s]),
                (4, Form::RR) => a.$op(R32[d], R32[s]),
                (4, Form::MR) => a.$op(dword_ptr(m), R32[s]),
                (4, _) => a.lock().$op(dword_ptr(m), R32[s]),
                (2, Form::RR) => a.$op(R16[d], R16[s]),
                (2, Form::MR) => a.$op(word_ptr(m), R16[s]),
                (2, _) => a.lock().$op(word_ptr(m), R16[s]),
                (_, Form::RR) => a.$op(R8X[d], R8X[s]),
                (_, Form::MR) => a.$op(byte_ptr(m), R8X[s]),
                (_, _) => a.lock().$op(byte_ptr(m), R8X[s]),
            }
        }
    };
}

xop_emitter!(emit_xadd, xadd);
xop_emitter!(emit_cmpxchg, cmpxchg);

fn emit_imul2(a: &mut CodeAssembler, f: Form, size: u32, r: Regs, _imm: i32) -> Result<(), IcedError> {
    let (d, s, m) = (r.d, r.s, r.mem());
    match (size, f) {
        (8, Form::RR) => a.imul_2(R64[d], R64[s]),
        (8, _) => a.imul_2(R64[d], qword_ptr(m)),
        (4, Form::RR) => a.imul_2(R32[d], R32[s]),
        (4, _) => a.imul_2(R32[d], dword_ptr(m)),
        (_, Form::RR) => a.imul_2(R16[d], R16[s]),
        (_, _) => a.imul_2(R16[d], word_ptr(m)),
    }
}

/// IMUL r, r/m, imm: RI/RI8 mean a register source, MI/MI8 a memory one.
fn emit_imul3(a: &mut CodeAssembler, f: Form, size: u32, r: Regs, imm: i32) -> Result<(), IcedError> {
    let (d, s, m) = (r.d, r.s, r.mem());
    match (size, f.has_mem()) {
        (8, false) => a.imul_3(R64[d], R64[s], imm),
        (8, true) => a.imul_3(R64[d], qword_ptr(m), imm),
        (4, false) => a.imul_3(R32[d], R32[s], imm),
        (4, true) => a.imul_3(R32[d], dword_ptr(m), imm),
        (_, false) => a.imul_3(R16[d], R16[s], imm),
        (_, true) => a.imul_3(R16[d], word_ptr(m), imm),
    }
}

type Emitter = fn(&mut CodeAssembler, Form, u32, Regs, i32) -> Result<(), IcedError>;

/// An instruction under test: name, emitter, flags the SDM leaves undefined.
#[derive(Clone, Copy)]
struct Op<'a>(&'a str, Emitter, u64);

/// Run `cases_per_form()` cases of one instruction in one form and size.
/// `fix` adjusts the start state (e.g. to keep DIV from faulting).
fn run_form(op: Op, size: u32, form: Form, seed: u64, avoid: &[usize], fix: &dyn Fn(&mut Rng, &mut Case, &Regs)) {
    let Op(op, emit, undefined) = op;
    let name = format!("{op}/{} {}", size * 8, form.name());
    run_cases(&name, cases_per_form(), seed, |rng| {
        let (mut c, r) = setup(rng, size, form, 1, avoid);
        let imm = pick_imm(rng, size, form);
        c.code = assemble(|a| emit(a, form, size, r, imm));
        c.undefined_flags = undefined;
        fix(rng, &mut c, &r);
        c
    });
}

fn no_fix(_: &mut Rng, _: &mut Case, _: &Regs) {}

const SIZES: [u32; 4] = [1, 2, 4, 8];

#[test]
fn arith_logic() {
    let ops: [(&str, Emitter, u64, bool); 9] = [
        ("add", emit_add, 0, true),
        ("adc", emit_adc, 0, true),
        ("sub", emit_sub, 0, true),
        ("sbb", emit_sbb, 0, true),
        ("and", emit_and, AF, true),
        ("or", emit_or, AF, true),
        ("xor", emit_xor, AF, true),
        ("cmp", emit_cmp, 0, false),
        ("test", emit_test, AF, false),
    ];
    let mut seed = 0xa100;
    for (op, emit, undefined, lockable) in ops {
        for size in SIZES {
            let mut forms = vec![Form::RR, Form::MR, Form::RI, Form::MI];
            if op != "test" {
                forms.push(Form::RM);
            }
            if size > 1 && op != "test" {
                forms.extend([Form::RI8, Form::MI8]);
            }
            if lockable {
                forms.extend([Form::LockMR, Form::LockMI]);
            }
            for form in forms {
                seed += 1;
                run_form(Op(op, emit, undefined), size, form, seed, &[], &no_fix);
            }
        }
    }
}

#[test]
fn unary() {
    let ops: [(&str, Emitter); 4] = [
        ("inc", emit_inc),
        ("dec", emit_dec),
        ("neg", emit_neg),
        ("not", emit_not),
    ];
    let mut seed = 0xa200;
    for (op, emit) in ops {
        for size in SIZES {
            for form in [Form::R, Form::M, Form::LockM] {
                seed += 1;
                run_form(Op(op, emit, 0), size, form, seed, &[], &no_fix);
            }
        }
    }
}

#[test]
fn multiply() {
    let mut seed = 0xa300;
    for size in SIZES {
        for form in [Form::R, Form::M] {
            seed += 1;
            run_form(Op("mul", emit_mul, MUL_UNDEF), size, form, seed, &[], &no_fix);
            seed += 1;
            run_form(Op("imul", emit_imul1, MUL_UNDEF), size, form, seed, &[], &no_fix);
        }
        if size == 1 {
            continue;
        }
        for form in [Form::RR, Form::RM] {
            seed += 1;
            run_form(Op("imul2", emit_imul2, MUL_UNDEF), size, form, seed, &[], &no_fix);
        }
        for form in [Form::RI8, Form::RI, Form::MI8, Form::MI] {
            seed += 1;
            // Forms name the second operand and the immediate: r,r,imm8 = "r,imm8".
            run_form(Op("imul3", emit_imul3, MUL_UNDEF), size, form, seed, &[], &no_fix);
        }
    }
}

/// Location of the divisor: (register id or memory offset).
fn divisor_of(c: &Case, r: &Regs, form: Form, size: u32) -> u64 {
    if form.has_mem() {
        let o = r.off as usize;
        let mut b = [0u8; 8];
        b[..size as usize].copy_from_slice(&c.mem[o..o + size as usize]);
        u64::from_le_bytes(b)
    } else {
        reg_val(&c.gpr, r.d, size)
    }
}

fn set_divisor(c: &mut Case, r: &Regs, form: Form, size: u32, v: u64) {
    if form.has_mem() {
        let o = r.off as usize;
        c.mem[o..o + size as usize].copy_from_slice(&v.to_le_bytes()[..size as usize]);
    } else {
        set_reg_val(&mut c.gpr, r.d, size, v);
    }
}

/// Dividend (high, low) halves as the instruction sees them.
fn dividend_of(c: &Case, size: u32) -> (u64, u64) {
    if size == 1 {
        ((c.gpr[RAX] >> 8) & 0xff, c.gpr[RAX] & 0xff)
    } else {
        (c.gpr[RDX] & mask(size), c.gpr[RAX] & mask(size))
    }
}

fn set_dividend_high(c: &mut Case, size: u32, hi: u64) {
    if size == 1 {
        set_reg_val(&mut c.gpr, 16, 1, hi);
    } else {
        set_reg_val(&mut c.gpr, RDX, size, hi);
    }
}

/// Whether a signed divide would fault.
fn idiv_faults(hi: u64, lo: u64, divisor: u64, size: u32) -> bool {
    let bits = size * 8;
    let sx = |v: u64| ((v << (64 - bits)) as i64 >> (64 - bits)) as i128;
    let dividend = (((sx(hi) as u128) << bits) | lo as u128) as i128;
    let dividend = (dividend << (128 - 2 * bits)) >> (128 - 2 * bits);
    let d = sx(divisor);
    if d == 0 {
        return true;
    }
    match dividend.checked_div(d) {
        None => true,
        Some(q) => q < -(1i128 << (bits - 1)) || q >= 1i128 << (bits - 1),
    }
}

#[test]
fn divide() {
    let mut seed = 0xa400;
    // The divisor register is never part of the dividend (AL AH DL DH /
    // RAX RDX); the inputs are adjusted so the host never raises #DE.
    let avoid = [RAX, RDX, 16, 18];
    for size in SIZES {
        for form in [Form::R, Form::M] {
            seed += 1;
            let fix_div = move |rng: &mut Rng, c: &mut Case, r: &Regs| {
                let mut dv = divisor_of(c, r, form, size);
                if dv == 0 {
                    dv = 1 + rng.below(mask(size));
                    set_divisor(c, r, form, size, dv);
                }
                let (hi, _) = dividend_of(c, size);
                if hi >= dv {
                    set_dividend_high(c, size, hi % dv);
                }
            };
            run_form(Op("div", emit_div, DIV_UNDEF), size, form, seed, &avoid, &fix_div);
            seed += 1;
            let fix_idiv = move |rng: &mut Rng, c: &mut Case, r: &Regs| {
                let mut dv = divisor_of(c, r, form, size);
                if dv == 0 {
                    dv = 1 + rng.below(mask(size));
                    set_divisor(c, r, form, size, dv);
                }
                let (hi, lo) = dividend_of(c, size);
                if idiv_faults(hi, lo, dv, size) {
                    // Sign-extend the low half: the quotient then fits unless
                    // it is MIN / -1.
                    let neg = lo >> (size * 8 - 1) & 1 != 0;
                    set_dividend_high(c, size, if neg { mask(size) } else { 0 });
                    if idiv_faults(if neg { mask(size) } else { 0 }, lo, dv, size) {
                        set_divisor(c, r, form, size, 1);
                    }
                }
            };
            run_form(Op("idiv", emit_idiv, DIV_UNDEF), size, form, seed, &avoid, &fix_idiv);
        }
    }
}

#[test]
fn exchange_add_and_compare_exchange() {
    let mut seed = 0xa500;
    for size in SIZES {
        for form in [Form::RR, Form::MR, Form::LockMR] {
            seed += 1;
            run_form(Op("xadd", emit_xadd, 0), size, form, seed, &[], &no_fix);
            seed += 1;
            // Half the cases make the destination equal to the accumulator.
            let fix = move |rng: &mut Rng, c: &mut Case, r: &Regs| {
                if rng.below(2) == 0 {
                    let acc = c.gpr[RAX] & mask(size);
                    set_divisor(c, r, if form == Form::RR { Form::R } else { Form::M }, size, acc);
                }
            };
            run_form(Op("cmpxchg", emit_cmpxchg, 0), size, form, seed, &[], &fix);
        }
    }
}

#[test]
fn compare_exchange_wide() {
    let mut seed = 0xa600;
    for (wide, form) in [
        (false, Form::M),
        (false, Form::LockM),
        (true, Form::M),
        (true, Form::LockM),
    ] {
        seed += 1;
        let size: u32 = if wide { 16 } else { 8 };
        let name = format!("cmpxchg{}b {}", size, form.name());
        run_cases(&name, cases_per_form(), seed, |rng| {
            let (mut c, r) = setup(rng, 8, form, if wide { 16 } else { 1 }, &[RAX, RDX, RCX, RBX]);
            c.code = assemble(|a| {
                let m = r.mem();
                match (wide, form.locked()) {
                    (false, false) => a.cmpxchg8b(qword_ptr(m)),
                    (false, true) => a.lock().cmpxchg8b(qword_ptr(m)),
                    (true, false) => a.cmpxchg16b(xmmword_ptr(m)),
                    (true, true) => a.lock().cmpxchg16b(xmmword_ptr(m)),
                }
            });
            let o = r.off as usize;
            if rng.below(2) == 0 {
                // Equal: memory holds EDX:EAX (RDX:RAX).
                let (lo, hi) = (c.gpr[RAX], c.gpr[RDX]);
                if wide {
                    c.mem[o..o + 8].copy_from_slice(&lo.to_le_bytes());
                    c.mem[o + 8..o + 16].copy_from_slice(&hi.to_le_bytes());
                } else {
                    let v = (hi << 32) | (lo & 0xffff_ffff);
                    c.mem[o..o + 8].copy_from_slice(&v.to_le_bytes());
                }
            } else if wide && rng.below(2) == 0 {
                // Only one half differs.
                let (lo, hi) = (c.gpr[RAX], c.gpr[RDX]);
                c.mem[o..o + 8].copy_from_slice(&lo.to_le_bytes());
                c.mem[o + 8..o + 16].copy_from_slice(&(hi ^ 1).to_le_bytes());
            }
            c
        });
    }
}

#[test]
fn flags_to_ah_and_back() {
    for (i, (name, code)) in [("lahf", assemble(|a| a.lahf())), ("sahf", assemble(|a| a.sahf()))]
        .into_iter()
        .enumerate()
    {
        run_cases(name, cases_per_form(), 0xa700 + i as u64, |rng| {
            let mut c = Case::new(code.clone());
            for v in c.gpr.iter_mut() {
                *v = rng.edgy();
            }
            c.rflags = rng.next_u64() & (STATUS | CF | OF);
            c
        });
    }
}
