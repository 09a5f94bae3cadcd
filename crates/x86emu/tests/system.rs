//! System instructions through the public API: mode switches, privilege
//! changes, interrupts and exceptions, MSRs, CPUID, port I/O and the TLB.
//!
//! The guest code is assembled from `system_asm/*.S` (run
//! `system_asm/build.sh` after editing them); the images are committed.

use x86emu::exec::system::msr;
use x86emu::state::{cr, flags, reg, DescriptorTable, Seg, Segment};
use x86emu::testbus::TestBus;
use x86emu::{Cpu, CpuState, Exit};

const TRAMPOLINE: &[u8] = include_bytes!("system_asm/trampoline.bin");
const LM: &[u8] = include_bytes!("system_asm/lm.bin");
const PM: &[u8] = include_bytes!("system_asm/pm.bin");

const MEM: u64 = 4 << 20;
const PML4: u64 = 0x1000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x600;
const IDT: u64 = 0x8000;
const TSS: u64 = 0x30000;
const TSS32: u64 = 0x7000;
const KSTACK: u64 = 0x90000;
const RSP0: u64 = 0x80000;
const USTACK: u64 = 0x50000;
const LM_BASE: u64 = 0x10000;
const PM_BASE: u64 = 0x20000;

/// Kernel/user code and data descriptors, Linux's layout for SYSRET:
/// 0x08 code32, 0x10 code64, 0x18 data, 0x20 user code32, 0x28 user data,
/// 0x30 user code64, 0x40 TSS.
const GDT_ENTRIES: [u64; 7] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_fb00_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
];

fn tss_descriptor(base: u64, limit: u64, type_: u64) -> (u64, u64) {
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((0x80 | type_) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (lo, base >> 32)
}

/// Identity-map the first 4 MiB with two user-accessible 2 MiB pages.
fn identity_map(bus: &mut TestBus) {
    bus.write_u64(PML4, 0x2000 | 7);
    bus.write_u64(0x2000, PD | 7);
    bus.write_u64(PD, 0x87);
    bus.write_u64(PD + 8, 0x20_0000 | 0x87);
}

fn write_gdt(bus: &mut TestBus, tss: (u64, u64)) {
    for (i, d) in GDT_ENTRIES.iter().enumerate() {
        bus.write_u64(GDT + i as u64 * 8, *d);
    }
    bus.write_u64(GDT + 0x40, tss.0);
    bus.write_u64(GDT + 0x48, tss.1);
}

fn seg(sel: u16) -> Segment {
    Segment::from_descriptor(sel, GDT_ENTRIES[(sel >> 3) as usize])
}

struct Env {
    cpu: Cpu,
    bus: TestBus,
}

impl Env {
    /// 64-bit kernel mode with the image `lm.bin`: IDT gates to the stubs
    /// at 0x10000 + v*16 (vectors 3, 4 and 0x80 callable from CPL 3), a
    /// 64-bit TSS with RSP0.
    fn long() -> Env {
        let mut bus = TestBus::new(MEM);
        identity_map(&mut bus);
        write_gdt(&mut bus, tss_descriptor(TSS, 0x67, 0xb));
        for v in 0..256u64 {
            let target = LM_BASE + v * 16;
            let dpl = if matches!(v, 3 | 4 | 0x80) { 3 } else { 0 };
            let lo = (target & 0xffff) | (0x10 << 16) | (0x8e << 40) | (dpl << 45) | ((target & 0xffff_0000) << 32);
            bus.write_u64(IDT + v * 16, lo);
            bus.write_u64(IDT + v * 16 + 8, target >> 32);
        }
        bus.write_u64(TSS + 4, RSP0);
        // No I/O bitmap: its offset lies beyond the TSS limit.
        bus.load(TSS + 0x66, &0x68u16.to_le_bytes());
        bus.load(LM_BASE, LM);
        let mut s = CpuState::long_mode_flat(PML4);
        s.gdtr = DescriptorTable { base: GDT, limit: 0x4f };
        s.idtr = DescriptorTable {
            base: IDT,
            limit: 0xfff,
        };
        s.tr = Segment {
            selector: 0x40,
            base: TSS,
            limit: 0x67,
            type_: 0xb,
            present: true,
            ..Default::default()
        };
        s.segs = [seg(0x18), seg(0x10), seg(0x18), seg(0x18), seg(0x18), seg(0x18)];
        s.gpr[reg::RSP] = KSTACK;
        let mut cpu = Cpu::standalone(MEM);
        cpu.set_state(s);
        Env { cpu, bus }
    }

    /// 32-bit protected mode without paging, with the image `pm.bin`.
    fn protected() -> Env {
        let mut bus = TestBus::new(MEM);
        write_gdt(&mut bus, tss_descriptor(TSS32, 0x67, 0xb));
        for v in 0..256u64 {
            let target = PM_BASE + v * 8;
            let dpl = if matches!(v, 3 | 4 | 0x80) { 3 } else { 0 };
            let lo = (target & 0xffff) | (0x08 << 16) | ((0x8e | (dpl << 5)) << 40) | ((target >> 16) << 48);
            bus.write_u64(IDT + v * 8, lo);
        }
        bus.write_u32(TSS32 + 4, RSP0 as u32);
        bus.write_u32(TSS32 + 8, 0x18);
        bus.load(PM_BASE, PM);
        let mut s = CpuState::reset();
        s.cr0 = cr::CR0_PE | cr::CR0_ET | cr::CR0_NE;
        s.gdtr = DescriptorTable { base: GDT, limit: 0x4f };
        s.idtr = DescriptorTable {
            base: IDT,
            limit: 0x7ff,
        };
        s.tr = Segment {
            selector: 0x40,
            base: TSS32,
            limit: 0x67,
            type_: 0xb,
            present: true,
            ..Default::default()
        };
        s.segs = [seg(0x18), seg(0x08), seg(0x18), seg(0x18), seg(0x18), seg(0x18)];
        s.gpr[reg::RSP] = KSTACK;
        let mut cpu = Cpu::standalone(MEM);
        cpu.set_state(s);
        Env { cpu, bus }
    }

    /// Switch to 64-bit user mode (CPL 3) on the user stack.
    fn user64(&mut self) {
        let s = &mut self.cpu.state;
        s.segs[Seg::Cs as usize] = seg(0x33);
        s.segs[Seg::Ss as usize] = seg(0x2b);
        s.gpr[reg::RSP] = USTACK;
    }

    fn run_at(&mut self, rip: u64) -> Exit {
        self.cpu.state.rip = rip;
        self.cpu.state.events.halted = false;
        self.cpu.run(&mut self.bus, 10_000)
    }

    fn run(&mut self) -> Exit {
        self.cpu.run(&mut self.bus, 10_000)
    }

    fn gpr(&self, r: usize) -> u64 {
        self.cpu.state.gpr[r]
    }

    /// The `i`-th 8-byte slot of the stack.
    fn stack64(&self, i: u64) -> u64 {
        self.bus.read_u64(self.gpr(reg::RSP) + 8 * i)
    }

    fn stack32(&self, i: u64) -> u32 {
        self.bus.read_u32(self.gpr(reg::RSP) + 4 * i)
    }

    /// The vector the stub that halted was entered for.
    fn vector(&self) -> u64 {
        self.gpr(15)
    }
}

const R8: usize = 8;
const R9: usize = 9;
const R10: usize = 10;
const R11: usize = 11;
const R12: usize = 12;
const R13: usize = 13;
const R14: usize = 14;

#[test]
fn real_to_protected_to_long_mode_like_the_linux_trampoline() {
    let mut bus = TestBus::new(MEM);
    identity_map(&mut bus);
    bus.load(0x10000, TRAMPOLINE);
    let mut cpu = Cpu::standalone(MEM);
    let mut s = CpuState::reset();
    s.segs[Seg::Cs as usize] = Segment::real_mode(0x1000, true);
    s.rip = 0;
    cpu.set_state(s);
    assert_eq!(cpu.run(&mut bus, 1000), Exit::Halted);
    let s = &cpu.state;
    assert!(s.in_64bit());
    assert_eq!(s.efer, cr::EFER_SCE | cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE);
    assert_eq!(s.cr0, 0x8005_0033);
    assert_eq!(s.cr4, cr::CR4_PAE);
    assert_eq!(s.seg(Seg::Cs).selector, 0x10);
    assert_eq!(s.gdtr.limit, 31);
    // EFER read from compatibility mode already had LMA.
    assert_eq!(s.gpr[reg::RSI], 0xd01);
    assert_eq!(s.gpr[reg::RAX], 0x1122_3344_5566_7788);
    // RIP-relative addressing works in the new mode: RDI = address of HLT.
    assert_eq!(s.gpr[reg::RDI] + 1, s.rip);
    assert_eq!(s.gpr[reg::RSP], 0x90000);
}

#[test]
fn iretq_to_user_and_interrupt_back_through_rsp0() {
    let mut e = Env::long();
    assert_eq!(e.run_at(0x11000), Exit::Halted);
    assert_eq!(e.vector(), 0x80);
    assert_eq!(e.cpu.state.cpl(), 0);
    assert_eq!(e.gpr(reg::RSP), RSP0 - 40);
    assert_eq!(e.stack64(0), 0x11047, "RIP after INT");
    assert_eq!(e.stack64(1), 0x33);
    assert_eq!(e.stack64(2), flags::FIXED1 | flags::IF);
    assert_eq!(e.stack64(3), USTACK);
    assert_eq!(e.stack64(4), 0x2b);
    assert_eq!(e.gpr(reg::RBX), 0x1234);
    // The kernel's DPL 0 data segments were nulled on the way out.
    assert_eq!(e.cpu.state.seg(Seg::Ds).selector, 0);
    // IRETQ back to user mode; it runs on to a UD2.
    assert_eq!(e.run_at(0x11100), Exit::Halted);
    assert_eq!(e.vector(), 6);
    assert_eq!(e.gpr(reg::RCX), 0x1234);
    assert_eq!(e.gpr(reg::RDX), 0x33);
    assert_eq!(e.stack64(0), 0x1104b);
    assert_eq!(e.stack64(1), 0x33);
    assert_eq!(e.gpr(reg::RSP), RSP0 - 40);
}

#[test]
fn syscall_sysret_round_trip() {
    let mut e = Env::long();
    assert_eq!(e.run_at(0x11200), Exit::Halted);
    let s = &e.cpu.state;
    assert_eq!(s.cpl(), 0);
    assert_eq!(s.seg(Seg::Cs).selector, 0x10);
    assert_eq!(s.seg(Seg::Ss).selector, 0x18);
    // SFMASK cleared IF and DF in the kernel; R11 kept the user's flags.
    assert_eq!(e.gpr(R14) & (flags::IF | flags::DF | flags::TF), 0);
    assert_eq!(e.gpr(R12), flags::FIXED1 | flags::IF | flags::DF);
    assert_eq!(e.gpr(R13), 0x11263, "RCX = return address");
    assert_eq!(e.gpr(R10), 0x10);
    // Back in user mode after SYSRETQ: RAX from the kernel, CS/SS at RPL 3.
    assert_eq!(e.gpr(reg::RBX), 99);
    assert_eq!(e.gpr(reg::RSI), 0x33);
    assert_eq!(e.gpr(reg::RBP), 0x2b);
    assert_eq!(e.gpr(R11), flags::FIXED1 | flags::IF | flags::DF);
    assert_eq!(e.gpr(reg::RCX), 0x11273);
    assert_eq!(s.rip, 0x1128a);
}

#[test]
fn syscall_needs_efer_sce_and_sysret_checks_rcx() {
    let mut e = Env::long();
    e.cpu.state.efer &= !cr::EFER_SCE;
    e.bus.load(0x12000, &[0x0f, 0x05]); // syscall
    assert_eq!(e.run_at(0x12000), Exit::Halted);
    assert_eq!(e.vector(), 6);
    let mut e = Env::long();
    e.cpu.state.gpr[reg::RCX] = 0x8000_0000_0000_0000;
    e.bus.load(0x12000, &[0x48, 0x0f, 0x07]); // sysretq
    assert_eq!(e.run_at(0x12000), Exit::Halted);
    assert_eq!(e.vector(), 13);
    assert_eq!(e.stack64(1), 0x12000);
    assert_eq!(e.cpu.state.cpl(), 0);
}

#[test]
fn hlt_exits_and_an_injected_interrupt_resumes() {
    let mut e = Env::long();
    e.cpu.state.rflags = flags::FIXED1;
    assert_eq!(e.run_at(0x11400), Exit::Halted);
    assert_eq!(e.cpu.state.rip, 0x11402);
    assert!(e.cpu.state.events.halted);
    // Nothing pending: it stays halted.
    assert_eq!(e.run(), Exit::Halted);
    assert_eq!(e.cpu.state.rip, 0x11402);
    e.cpu.inject_interrupt(0x20);
    assert_eq!(e.run(), Exit::Halted);
    assert_eq!(e.vector(), 0x20);
    assert_eq!(e.stack64(0), 0x11402, "returns after the HLT");
    // An interrupt from the bus's controller also wakes it.
    let mut e = Env::long();
    assert_eq!(e.run_at(0x11400), Exit::Halted);
    e.bus.interrupts.push_back(0x21);
    assert_eq!(e.run(), Exit::Halted);
    assert_eq!(e.vector(), 0x21);
    assert_eq!(e.stack64(0), 0x11402);
}

#[test]
fn sti_blocks_interrupts_for_one_instruction() {
    let mut e = Env::long();
    e.cpu.state.rflags = flags::FIXED1;
    e.cpu.inject_interrupt(0x20);
    assert_eq!(e.run_at(0x11440), Exit::Halted);
    assert_eq!(e.vector(), 0x20);
    assert_eq!(e.gpr(reg::RBX), 1, "the instruction after STI ran");
    assert_eq!(e.stack64(0), 0x11446, "but not the one after that");
}

#[test]
fn an_sti_shadow_outlives_a_return_from_run() {
    // STI then HLT: the run ends right after the STI (budget spent), and
    // an interrupt arrives before the next run. The HLT still runs in the
    // shadow, and the interrupt wakes it: it returns after the HLT. Were
    // the shadow dropped at the return, the interrupt would be taken
    // before the HLT, which would then halt with its work pending.
    let mut e = Env::long();
    e.cpu.state.rflags = flags::FIXED1;
    e.cpu.state.rip = 0x11400;
    assert_eq!(e.cpu.run(&mut e.bus, 1), Exit::Budget);
    assert_eq!(e.cpu.state.rip, 0x11401, "only the STI ran");
    e.cpu.inject_interrupt(0x20);
    assert_eq!(e.run(), Exit::Halted);
    assert_eq!(e.vector(), 0x20);
    assert_eq!(e.stack64(0), 0x11402, "the HLT ran in the shadow before the interrupt");
}

#[test]
fn a_halted_cpu_with_a_shadow_in_its_state_still_wakes() {
    // A restored state (a snapshot file is untrusted) may say halted and
    // in a shadow at once. A halted CPU is past any instruction a shadow
    // covers: an interrupt must wake it, not be held off for ever.
    let mut e = Env::long();
    e.cpu.state.rflags = flags::FIXED1 | flags::IF;
    e.cpu.state.rip = 0x11402;
    e.cpu.state.events.halted = true;
    e.cpu.state.events.interrupt_shadow = true;
    e.cpu.inject_interrupt(0x20);
    assert_eq!(e.run(), Exit::Halted);
    assert_eq!(e.vector(), 0x20, "the interrupt was delivered");
    assert_eq!(e.stack64(0), 0x11402, "to the halted CPU");
}

#[test]
fn mov_cr3_and_invlpg_flush_the_tlb() {
    let mut e = Env::long();
    e.bus.write_u64(0x20_0000, 0xaaaa);
    e.bus.write_u64(0x20_1000, 0xbbbb);
    e.bus.write_u64(0, 0xcccc);
    e.cpu.state.gpr[reg::RDI] = PD + 8;
    assert_eq!(e.run_at(0x11480), Exit::Halted);
    assert_eq!(e.gpr(reg::RAX), 0xaaaa);
    assert_eq!(e.gpr(R8), 0xbbbb);
    assert_eq!(e.gpr(reg::RBX), 0xaaaa, "stale until the flush");
    assert_eq!(e.gpr(reg::RCX), 0xcccc, "MOV CR3 flushed");
    assert_eq!(e.gpr(R10), 0x2027, "physical 0x1000 holds the PML4 (accessed)");
    assert_eq!(e.gpr(R9), 0xbbbb, "INVLPG dropped the whole 2 MiB page");
}

#[test]
fn in_and_out_reach_the_bus() {
    let mut e = Env::long();
    e.bus.io_reads.extend([0x5a, 0x1234_5678]);
    assert_eq!(e.run_at(0x11500), Exit::Halted);
    assert_eq!(e.bus.io_writes, vec![(0x3f8, 1, 0x41), (0x80, 2, 0xbeef)]);
    assert_eq!(e.gpr(reg::RBX) & 0xff, 0x5a);
    assert_eq!(e.gpr(reg::RCX), 0x1234_5678);
}

#[test]
fn user_io_goes_through_the_tss_bitmap() {
    let mut e = Env::long();
    // I/O bitmap at offset 0x68: everything denied except port 0x3f8.
    let limit = 0x68 + 0x2000;
    e.bus.load(TSS + 0x66, &0x68u16.to_le_bytes());
    for i in 0..0x2000 {
        e.bus.load(TSS + 0x68 + i, &[0xff]);
    }
    e.bus.load(TSS + 0x68 + 0x3f8 / 8, &[0xfe]);
    e.cpu.state.tr.limit = limit as u32;
    e.user64();
    assert_eq!(e.run_at(0x11580), Exit::Halted);
    assert_eq!(e.vector(), 13);
    assert_eq!(e.stack64(0), 0, "error code");
    assert_eq!(e.stack64(1), 0x11589, "faulting OUT");
    assert_eq!(e.bus.io_writes.len(), 1);
    assert_eq!(e.bus.io_writes[0].0, 0x3f8);
}

#[test]
fn msrs_bus_tsc_and_unknown() {
    let mut e = Env::long();
    e.bus.msrs.push((0x6e0, 0x77));
    assert_eq!(e.run_at(0x11600), Exit::Halted);
    assert_eq!(e.gpr(reg::RBX), 0x77, "forwarded to the bus");
    assert_eq!(e.gpr(reg::RSI), 0x1000, "TSC high half after WRMSR");
    assert_eq!(e.vector(), 13, "unknown MSR");
    assert_eq!(e.stack64(0), 0);
    assert_eq!(e.stack64(1), 0x11624);
}

#[test]
fn msr_checks() {
    let mut e = Env::long();
    let (cpu, bus) = (&mut e.cpu, &mut e.bus);
    // EFER: reserved bits, LME while paging, LMA read-only.
    assert!(msr::write_msr(cpu, bus, msr::EFER, 1 << 12).is_err());
    assert!(msr::write_msr(cpu, bus, msr::EFER, cr::EFER_SCE).is_err());
    let efer = cpu.state.efer;
    assert!(msr::write_msr(cpu, bus, msr::EFER, efer & !cr::EFER_LMA).is_ok());
    assert_eq!(cpu.state.efer, efer);
    // Canonical checks.
    assert!(msr::write_msr(cpu, bus, msr::LSTAR, 0x0000_8000_0000_0000).is_err());
    assert!(msr::write_msr(cpu, bus, msr::FS_BASE, 0xffff_8000_0000_0000).is_ok());
    assert_eq!(cpu.state.seg(Seg::Fs).base, 0xffff_8000_0000_0000);
    assert!(msr::write_msr(cpu, bus, msr::KERNEL_GS_BASE, 1 << 50).is_err());
    // PAT memory types.
    assert!(msr::write_msr(cpu, bus, msr::PAT, 0x0007_0406_0007_0402).is_err());
    assert!(msr::write_msr(cpu, bus, msr::PAT, 0x0007_0106_0007_0406).is_ok());
    // Storage MSRs and fixed values.
    assert!(msr::write_msr(cpu, bus, 0x200, 0x8000_0006).is_ok());
    assert_eq!(msr::read_msr(cpu, bus, 0x200), Some(0x8000_0006));
    assert_eq!(msr::read_msr(cpu, bus, msr::MTRRCAP), Some(0x508));
    // ARCH_CAPABILITIES: the fixed immunities, read-only.
    assert_eq!(
        msr::read_msr(cpu, bus, msr::ARCH_CAPABILITIES),
        Some(x86emu::config::ARCH_CAPABILITIES)
    );
    assert!(msr::write_msr(cpu, bus, msr::ARCH_CAPABILITIES, 0).is_err());
    assert_eq!(msr::read_msr(cpu, bus, msr::APIC_BASE), Some(0xfee0_0800));
    assert!(msr::write_msr(cpu, bus, msr::UCODE_REV, 0).is_ok());
    assert_eq!(msr::read_msr(cpu, bus, 0xc001_0015), None);
    // TSC writes move the offset.
    assert!(msr::write_msr(cpu, bus, msr::TSC, 1_000_000).is_ok());
    assert_eq!(msr::read_msr(cpu, bus, msr::TSC), Some(1_000_000));
}

#[test]
fn cpuid_values() {
    let mut e = Env::long();
    e.cpu.config.apic_id = 3;
    e.cpu.config.cpu_count = 4;
    e.cpu.state.gpr[reg::RAX] = 0xffff_ffff_0000_0001;
    e.cpu.state.gpr[reg::RBX] = u64::MAX;
    assert_eq!(e.run_at(0x11680), Exit::Halted);
    assert_eq!(e.gpr(reg::RAX), 0x0003_06a9);
    assert_eq!(e.gpr(reg::RBX) >> 24, 3, "APIC id");
    assert_eq!((e.gpr(reg::RBX) >> 16) & 0xff, 4);
    assert!(e.gpr(reg::RCX) & (1 << 31) != 0, "hypervisor");
    assert_eq!(e.gpr(reg::RCX) & (1 << 27), 0, "no OSXSAVE");
    assert!(e.gpr(reg::RDX) & (1 << 25) != 0, "SSE");
    e.cpu.state.gpr[reg::RAX] = 0;
    e.cpu.state.events.halted = false;
    assert_eq!(e.run_at(0x11680), Exit::Halted);
    let mut vendor = Vec::new();
    for r in [reg::RBX, reg::RDX, reg::RCX] {
        vendor.extend_from_slice(&(e.gpr(r) as u32).to_le_bytes());
    }
    assert_eq!(&vendor, b"GenuineIntel");
}

#[test]
fn user_page_fault_error_code_and_cr2() {
    let mut e = Env::long();
    e.user64();
    assert_eq!(e.run_at(0x116c0), Exit::Halted);
    assert_eq!(e.vector(), 14);
    assert_eq!(e.cpu.state.cr2, 0x40_0010);
    assert_eq!(e.stack64(0), 6, "write, user, not present");
    assert_eq!(e.stack64(1), 0x116c0);
    assert_eq!(e.stack64(2), 0x33);
    assert_eq!(e.stack64(4), USTACK);
    assert_eq!(e.gpr(reg::RSP), RSP0 - 48);
}

#[test]
fn int3_and_int_n_frames_in_64bit_mode() {
    let mut e = Env::long();
    e.cpu.state.gpr[reg::RSP] = KSTACK - 8; // the CPU aligns to 16
    assert_eq!(e.run_at(0x11700), Exit::Halted);
    assert_eq!(e.vector(), 3);
    assert_eq!(e.gpr(reg::RSP), KSTACK - 16 - 40);
    assert_eq!(e.stack64(0), 0x11701);
    assert_eq!(e.stack64(1), 0x10);
    assert_eq!(e.stack64(3), KSTACK - 8);
    assert_eq!(e.stack64(4), 0x18);
    let mut e = Env::long();
    assert_eq!(e.run_at(0x11710), Exit::Halted);
    assert_eq!(e.vector(), 0x81);
    assert_eq!(e.stack64(0), 0x11712);
}

#[test]
fn privileged_instructions_fault_at_cpl3() {
    for off in (0x1800..0x1900).step_by(16) {
        let mut e = Env::long();
        e.user64();
        assert_eq!(e.run_at(LM_BASE + off), Exit::Halted, "{off:#x}");
        assert_eq!(e.vector(), 13, "{off:#x}");
        assert_eq!(e.stack64(0), 0, "{off:#x}");
        assert_eq!(e.stack64(1), LM_BASE + off, "{off:#x}");
        assert_eq!(e.stack64(2), 0x33);
    }
    // MOV SS with a DPL 0 selector: #GP(selector).
    let mut e = Env::long();
    e.user64();
    assert_eq!(e.run_at(0x11900), Exit::Halted);
    assert_eq!((e.vector(), e.stack64(0), e.stack64(1)), (13, 0x18, 0x11905));
    // INT through a DPL 0 gate: #GP(vector*8+2) at the INT.
    let mut e = Env::long();
    e.user64();
    assert_eq!(e.run_at(0x11910), Exit::Halted);
    assert_eq!((e.vector(), e.stack64(0), e.stack64(1)), (13, 0x81 * 8 + 2, 0x11910));
    assert_eq!(e.stack64(4), USTACK, "user RSP untouched");
}

#[test]
fn far_return_to_compatibility_mode_and_iretq_back() {
    let mut e = Env::long();
    assert_eq!(e.run_at(0x11a00), Exit::Halted);
    assert_eq!(e.vector(), 0x80);
    assert_eq!(e.gpr(reg::RBX), 7);
    assert_eq!(e.stack64(0), 0x11a21);
    assert_eq!(e.stack64(1), 0x23);
    assert_eq!(e.stack64(3), USTACK);
    assert_eq!(e.stack64(4), 0x2b);
    assert!(e.cpu.state.in_64bit());
    // IRETQ to compatibility mode, which runs on to a UD2.
    assert_eq!(e.run_at(0x11100), Exit::Halted);
    assert_eq!(e.vector(), 6);
    assert_eq!(e.gpr(reg::RCX), 0x2b);
    assert_eq!(e.stack64(0), 0x11a23);
    assert_eq!(e.stack64(1), 0x23);
}

#[test]
fn enter_with_nesting() {
    let mut e = Env::long();
    let sp = KSTACK;
    let bp = 0x70000;
    e.bus.write_u64(bp - 8, 0xdead);
    e.cpu.state.gpr[reg::RBP] = bp;
    assert_eq!(e.run_at(0x11b00), Exit::Halted);
    assert_eq!(e.bus.read_u64(sp - 8), bp);
    assert_eq!(e.bus.read_u64(sp - 16), 0xdead);
    assert_eq!(e.bus.read_u64(sp - 24), sp - 8);
    assert_eq!(e.gpr(reg::RBP), sp - 8);
    assert_eq!(e.gpr(reg::RSP), sp - 40);
}

#[test]
fn int3_frame_in_32bit_protected_mode() {
    let mut e = Env::protected();
    assert_eq!(e.run_at(0x20800), Exit::Halted);
    assert_eq!(e.gpr(reg::RDI), 3);
    assert_eq!(e.gpr(reg::RSP), KSTACK - 12);
    assert_eq!(e.stack32(0), 0x20801);
    assert_eq!(e.stack32(1), 0x08);
    assert_eq!(e.stack32(2) as u64 & flags::FIXED1, flags::FIXED1);
}

#[test]
fn int_from_cpl3_in_32bit_mode_switches_to_ss0_esp0() {
    let mut e = Env::protected();
    let s = &mut e.cpu.state;
    s.segs[Seg::Cs as usize] = seg(0x23);
    s.segs[Seg::Ss as usize] = seg(0x2b);
    s.segs[Seg::Ds as usize] = seg(0x2b);
    s.gpr[reg::RSP] = 0x60000;
    assert_eq!(e.run_at(0x20810), Exit::Halted);
    assert_eq!(e.gpr(reg::RDI), 0x80);
    assert_eq!(e.gpr(reg::RBX), 0x77);
    assert_eq!(e.cpu.state.seg(Seg::Ss).selector, 0x18);
    assert_eq!(e.gpr(reg::RSP), RSP0 - 20);
    assert_eq!(e.stack32(0), 0x20817);
    assert_eq!(e.stack32(1), 0x23);
    assert_eq!(e.stack32(3), 0x60000);
    assert_eq!(e.stack32(4), 0x2b);
}

#[test]
fn iretd_to_cpl3_then_far_call_and_return() {
    let mut e = Env::protected();
    assert_eq!(e.run_at(0x20820), Exit::Halted);
    assert_eq!(e.gpr(reg::RDI), 0x80);
    assert_eq!(e.gpr(reg::RBX), 0x55);
    assert_eq!(e.stack32(0), 0x2083f);
    assert_eq!(e.stack32(1), 0x23);
    assert_eq!(e.stack32(2) as u64 & flags::IF, flags::IF);
    assert_eq!(e.stack32(3), 0x60000, "the far call's frame was popped");
    assert_eq!(e.stack32(4), 0x2b);
}

#[test]
fn real_mode_int_and_iret() {
    let mut bus = TestBus::new(1 << 20);
    // IVT entry 0x21 -> 0000:0600: IRET. Code at 0000:0500: INT 0x21; HLT.
    bus.write_u32(0x21 * 4, 0x0000_0600);
    bus.load(0x600, &[0xcf]);
    bus.load(0x500, &[0xcd, 0x21, 0xf4]);
    let mut cpu = Cpu::standalone(1 << 20);
    let mut s = CpuState::reset();
    s.segs[Seg::Cs as usize] = Segment::real_mode(0, true);
    s.rip = 0x500;
    s.gpr[reg::RSP] = 0x7000;
    s.rflags = flags::FIXED1 | flags::IF | flags::CF;
    cpu.set_state(s);
    assert_eq!(cpu.run(&mut bus, 100), Exit::Halted);
    assert_eq!(cpu.state.rip, 0x503);
    assert_eq!(cpu.state.gpr[reg::RSP], 0x7000);
    assert_eq!(cpu.state.rflags, flags::FIXED1 | flags::IF | flags::CF);
    assert_eq!(bus.ram()[0x7000 - 6], 0x02, "pushed IP");
}

#[test]
fn ltr_marks_the_tss_busy_and_descriptor_probes() {
    let mut e = Env::long();
    // An available 64-bit TSS descriptor (16 bytes) for LTR to load.
    let (lo, hi) = tss_descriptor(0x1234_5000, 0x67, 0x9);
    e.bus.write_u64(GDT + 0x40, lo);
    e.bus.write_u64(GDT + 0x48, hi);
    e.cpu.state.gpr[reg::RBX] = u64::MAX;
    e.cpu.state.gpr[R9] = 0x99;
    assert_eq!(e.run_at(0x11c00), Exit::Halted);
    assert_eq!((e.bus.read_u64(GDT + 0x40) >> 40) & 0xf, 0xb, "busy");
    let tr = e.cpu.state.tr;
    assert_eq!(
        (tr.selector, tr.base, tr.limit, tr.type_),
        (0x40, 0x1234_5000, 0x67, 0xb)
    );
    assert_eq!(e.gpr(reg::RBX), 0x40, "STR zero-extends");
    assert_eq!(e.gpr(reg::RDX), 0x00c0_f300, "LAR");
    assert_eq!(e.gpr(reg::RSI), 0xffff_ffff, "LSL");
    assert_eq!(e.gpr(R8) & flags::ZF, flags::ZF, "VERW of writable user data");
    assert_eq!(e.gpr(R9), 0x99, "LAR of an invalid selector leaves the destination");
    assert_eq!(e.gpr(R10) & flags::ZF, 0);
    assert_eq!(e.bus.read_u64(0x70002), GDT);
    assert_eq!(e.cpu.state.gdtr, DescriptorTable { base: GDT, limit: 0x4f });
}

#[test]
fn sysexit_and_sysenter() {
    let mut e = Env::long();
    assert_eq!(e.run_at(0x11d00), Exit::Halted);
    assert_eq!(e.gpr(reg::RBX), 0x33, "SYSEXITQ to 64-bit user code");
    assert_eq!(e.gpr(reg::RSI), 0x3b);
    assert_eq!(e.gpr(reg::RDI), 0x10, "SYSENTER to kernel code");
    assert_eq!(e.gpr(reg::RSP), 0x88000);
    assert_eq!(e.cpu.state.cpl(), 0);
    assert_eq!(e.cpu.state.rip, 0x11d43);
}

#[test]
fn iret_unmasks_nmis() {
    let mut e = Env::long();
    e.cpu.inject_nmi();
    assert_eq!(e.run_at(0x11440), Exit::Halted);
    assert_eq!(e.vector(), 2);
    assert!(e.cpu.state.events.nmi_masked);
    // A second NMI waits while the first handler runs...
    e.cpu.inject_nmi();
    assert_eq!(e.run(), Exit::Halted);
    assert_eq!(e.gpr(reg::RSP), KSTACK - 40);
    // ...and arrives right after its IRET.
    assert_eq!(e.run_at(0x11100), Exit::Halted);
    assert_eq!(e.vector(), 2);
    assert_eq!(e.stack64(0), 0x11440);
    assert_eq!(e.gpr(reg::RSP), KSTACK - 40);
    assert!(e.cpu.state.events.nmi_masked);
}

#[test]
fn popf_at_cpl3_keeps_if_and_iopl() {
    let mut e = Env::long();
    e.user64();
    e.cpu.state.rflags = flags::FIXED1;
    assert_eq!(e.run_at(0x11e00), Exit::Halted);
    assert_eq!(e.gpr(reg::RBX), flags::FIXED1 | flags::DF);
    assert_eq!(e.vector(), 13, "HLT at CPL 3");
}

#[test]
fn reserved_cr4_bits_fault() {
    let mut e = Env::long();
    assert_eq!(e.run_at(0x11e40), Exit::Halted);
    assert_eq!((e.vector(), e.stack64(0), e.stack64(1)), (13, 0, 0x11e45));
    assert_eq!(e.cpu.state.cr4, cr::CR4_PAE);
}
