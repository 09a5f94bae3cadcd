//! Differential tests for data movement (exec/data.rs) and near control flow.

use iced_x86::code_asm::*;

use crate::harness::*;

fn random_regs(rng: &mut Rng) -> [u64; 16] {
    let mut g = [0u64; 16];
    for v in g.iter_mut() {
        *v = rng.edgy();
    }
    g
}

#[test]
fn mov_forms() {
    let forms: Vec<(&str, Vec<u8>)> = vec![
        ("mov r64,r64", asm(|a| a.mov(rax, r9))),
        ("mov r32,r32", asm(|a| a.mov(eax, r9d))),
        ("mov r16,r16", asm(|a| a.mov(ax, r9w))),
        ("mov r8,r8 high", asm(|a| a.mov(ah, bl))),
        ("mov r8,r8 rex", asm(|a| a.mov(sil, r10b))),
        ("mov r64,imm64", asm(|a| a.mov(r11, 0x1234_5678_9abc_def0u64))),
        ("mov r64,simm32", asm(|a| a.mov(r11, -5i64))),
        ("movzx r32,r8", asm(|a| a.movzx(ecx, dh))),
        ("movzx r64,r16", asm(|a| a.movzx(rcx, dx))),
        ("movsx r64,r8", asm(|a| a.movsx(rcx, dl))),
        ("movsx r32,r16", asm(|a| a.movsx(ecx, dx))),
        ("movsxd r64,r32", asm(|a| a.movsxd(rcx, edx))),
        ("lea", asm(|a| a.lea(rax, qword_ptr(rbx + rcx * 4 + 0x10)))),
        ("lea32", asm(|a| a.lea(eax, qword_ptr(rbx + rcx * 8 - 3)))),
        ("xchg r,r", asm(|a| a.xchg(rax, rdx))),
        ("xchg r8,r8", asm(|a| a.xchg(al, ch))),
        ("bswap64", asm(|a| a.bswap(r12))),
        ("bswap32", asm(|a| a.bswap(r12d))),
        ("cbw", asm(|a| a.cbw())),
        ("cwde", asm(|a| a.cwde())),
        ("cdqe", asm(|a| a.cdqe())),
        ("cwd", asm(|a| a.cwd())),
        ("cdq", asm(|a| a.cdq())),
        ("cqo", asm(|a| a.cqo())),
    ];
    for (i, (name, code)) in forms.into_iter().enumerate() {
        run_cases(name, cases_per_form(), 0x1000 + i as u64, |rng| {
            let mut c = Case::new(code.clone());
            c.gpr = random_regs(rng);
            c
        });
    }
}

#[test]
fn memory_and_stack_forms() {
    let forms: Vec<(&str, Vec<u8>)> = vec![
        ("mov m64,r", asm(|a| a.mov(qword_ptr(rbx + 0x18), rcx))),
        ("mov r,m32", asm(|a| a.mov(ecx, dword_ptr(rbx + 0x1c)))),
        ("mov m8,imm", asm(|a| a.mov(byte_ptr(rbx + 7), 0x5a))),
        ("mov m16,r", asm(|a| a.mov(word_ptr(rbx + 0xdff), cx))),
        ("xchg m,r", asm(|a| a.xchg(qword_ptr(rbx + 8), rdx))),
        (
            "push pop",
            asm(|a| {
                a.push(rcx)?;
                a.push(qword_ptr(rbx))?;
                a.pop(rdx)?;
                a.pop(qword_ptr(rbx + 0x40))
            }),
        ),
        (
            "push imm pop16",
            asm(|a| {
                a.push(-3)?;
                a.pop(si)?;
                a.pop(di)
            }),
        ),
        ("xlat", asm(|a| a.xlatb())),
        (
            "leave",
            asm(|a| {
                a.mov(rbp, rsp)?;
                a.push(rcx)?;
                a.push(rdx)?;
                a.leave()
            }),
        ),
        (
            "call ret",
            asm(|a| {
                let mut f = a.create_label();
                let mut done = a.create_label();
                a.call(f)?;
                a.jmp(done)?;
                a.set_label(&mut f)?;
                a.mov(rax, qword_ptr(rsp))?;
                a.ret()?;
                a.set_label(&mut done)?;
                // The return address differs between native and emulated runs:
                // erase it from registers and memory.
                a.mov(rax, 0u64)?;
                a.mov(rcx, 0u64)?;
                a.mov(qword_ptr(rsp - 8), 0)
            }),
        ),
    ];
    for (i, (name, code)) in forms.into_iter().enumerate() {
        run_cases(name, cases_per_form(), 0x2000 + i as u64, |rng| {
            let mut c = Case::new(code.clone());
            c.gpr = random_regs(rng);
            c.gpr[RBX] = scratch_addr() + 0x100;
            for b in c.mem.iter_mut() {
                *b = rng.next_u64() as u8;
            }
            c
        });
    }
}
