//! Small payloads run under both engines from the same start state: the
//! host's KVM (through `vmm::kvm`) and x86emu (with its `TestBus`). The
//! final registers, memory, port and MMIO traffic must agree.
//!
//! They need /dev/kvm: on a host where it cannot be opened they fail and
//! say so (a test that cannot run must not pass). On a PVM-type KVM they
//! run (KVM emulates the payload's instructions), which is all they need.

use std::sync::Arc;

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::kvm::vcpu::Step;
use vmm::kvm::vm::{KvmVm, VmOptions};
use x86emu::state::{flags, CpuState, Segment};
use x86emu::testbus::TestBus;
use x86emu::{CodeMap, Cpu, CpuConfig, Exit};

/// RAM below this; the MMIO "device" lives above it.
const RAM: u64 = 0x80000;
const MMIO: u64 = 0x9_0000;
const CODE: u64 = 0x1000;
const DATA: u64 = 0x2000;
const PML4: u64 = 0x10000;

struct Outcome {
    state: CpuState,
    ram: Vec<u8>,
    io_writes: Vec<(u16, u8, u32)>,
    mmio_writes: Vec<(u64, Vec<u8>)>,
}

/// Fail the test, saying what is missing, when /dev/kvm cannot be used.
fn require_kvm() {
    if let Err(e) = kvm_ioctls::Kvm::new() {
        panic!(
            "this test needs the host's KVM, and /dev/kvm cannot be opened: {e}. \
             Run it on a host (or in a VM) with KVM and read-write access to /dev/kvm."
        );
    }
}

fn page_tables() -> Vec<(u64, u64)> {
    // PML4 -> PDPT -> PD with one 2 MiB identity page.
    vec![
        (PML4, (PML4 + 0x1000) | 3),
        (PML4 + 0x1000, (PML4 + 0x2000) | 3),
        (PML4 + 0x2000, 0x83),
    ]
}

fn run_emu(start: &CpuState, image: &[(u64, Vec<u8>)], io_reads: &[u32]) -> Outcome {
    let mut bus = TestBus::new(RAM);
    for (addr, bytes) in image {
        bus.load(*addr, bytes);
    }
    bus.io_reads.extend(io_reads.iter().copied());
    let mut cpu = Cpu::new(CpuConfig::default(), Arc::new(CodeMap::new(RAM)));
    cpu.set_state(start.clone());
    let exit = cpu.run(&mut bus, 10_000);
    assert_eq!(exit, Exit::Halted, "emu: {:?}", cpu.state);
    Outcome {
        state: cpu.state.clone(),
        ram: bus.ram().to_vec(),
        io_writes: bus.io_writes.clone(),
        mmio_writes: bus.mmio_writes.clone(),
    }
}

fn run_kvm(start: &CpuState, image: &[(u64, Vec<u8>)], io_reads: &[u32]) -> Outcome {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    for (addr, bytes) in image {
        mem.write_slice(bytes, GuestAddress(*addr)).unwrap();
    }
    let vm = KvmVm::new(&mem, VmOptions { irqchip: false }).expect("KVM VM");
    let mut vcpu = vm.create_vcpu(0, 1).expect("vCPU");
    vcpu.set_state(start, 0).expect("set state");
    // The same bus type handles the exits, so both engines see one device.
    let mut bus = TestBus::new(0x1000);
    bus.io_reads.extend(io_reads.iter().copied());
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 1000, "kvm: no HLT after 1000 exits");
        match vcpu.run_once(&mut bus) {
            Step::Continue | Step::Interrupted => {}
            Step::Halted => break,
            other => panic!("kvm: {other:?}"),
        }
    }
    let state = vcpu.get_state(0, &[]).expect("get state");
    let mut ram = vec![0u8; RAM as usize];
    mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
    Outcome {
        state,
        ram,
        io_writes: bus.io_writes.clone(),
        mmio_writes: bus.mmio_writes.clone(),
    }
}

/// Run under both engines and compare what a program can observe.
fn compare(start: CpuState, code: Vec<u8>, extra: Vec<(u64, Vec<u8>)>, io_reads: &[u32]) -> Outcome {
    require_kvm();
    let mut image = vec![(CODE, code)];
    image.extend(extra);
    let emu = run_emu(&start, &image, io_reads);
    let kvm = run_kvm(&start, &image, io_reads);
    assert_eq!(kvm.state.gpr, emu.state.gpr, "general registers");
    assert_eq!(kvm.state.rip, emu.state.rip, "rip");
    let visible = flags::STATUS | flags::DF | flags::IF | flags::FIXED1;
    assert_eq!(kvm.state.rflags & visible, emu.state.rflags & visible, "rflags");
    for (k, e) in kvm.state.segs.iter().zip(emu.state.segs.iter()) {
        assert_eq!((k.selector, k.base), (e.selector, e.base), "segments");
    }
    assert_eq!(kvm.io_writes, emu.io_writes, "port writes");
    assert_eq!(kvm.mmio_writes, emu.mmio_writes, "MMIO writes");
    if let Some(i) = (0..RAM as usize).find(|&i| kvm.ram[i] != emu.ram[i]) {
        panic!(
            "memory differs first at {i:#x}: kvm {:#x}, emu {:#x}",
            kvm.ram[i], emu.ram[i]
        );
    }
    kvm
}

#[test]
fn real_mode_arithmetic_ports_and_mmio() {
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(ax, 0x1234).unwrap();
    a.add(ax, 0x1111).unwrap();
    a.mov(bx, 0x00ff).unwrap();
    a.imul_2(ax, bx).unwrap();
    a.mov(word_ptr(DATA), ax).unwrap();
    a.xor(cx, cx).unwrap();
    a.dec(cx).unwrap();
    a.adc(cx, 5).unwrap();
    // Port I/O: an OUT of a byte and a word, an IN that the bus answers.
    a.mov(dx, 0x3f8).unwrap();
    a.mov(al, 0x41).unwrap();
    a.out(dx, al).unwrap();
    a.mov(dx, 0x80).unwrap();
    a.out(dx, ax).unwrap();
    a.in_(al, dx).unwrap();
    a.mov(byte_ptr(DATA + 2), al).unwrap();
    // MMIO at 0x9000:0000 (linear 0x90000): write a word, read one back.
    a.mov(si, 0x9000).unwrap();
    a.mov(es, si).unwrap();
    a.mov(word_ptr(0).es(), 0xbeef).unwrap();
    a.mov(di, word_ptr(2).es()).unwrap();
    a.pushf().unwrap();
    a.pop(bp).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();

    let mut start = CpuState::reset();
    start.segs[1] = Segment::real_mode(0, true);
    start.rip = CODE;
    start.gpr[4] = 0x7000;
    let out = compare(start, code, vec![], &[0x5a]);
    assert_eq!(out.state.gpr[0] & 0xff, 0x5a, "IN returned the bus's value");
    assert_eq!(out.io_writes, vec![(0x3f8, 1, 0x41), (0x80, 2, out.io_writes[1].2)]);
    assert_eq!(out.mmio_writes, vec![(MMIO, vec![0xef, 0xbe])]);
    assert_eq!(out.state.gpr[7] & 0xffff, 0xffff, "unclaimed MMIO reads all ones");
}

#[test]
fn long_mode_arithmetic_stack_ports_and_mmio() {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x0123_4567_89ab_cdefu64).unwrap();
    a.mov(rbx, 0x1_0000_0001u64).unwrap();
    a.mul(rbx).unwrap();
    a.mov(qword_ptr(DATA), rax).unwrap();
    a.mov(qword_ptr(DATA + 8), rdx).unwrap();
    a.mov(rcx, 7u64).unwrap();
    a.xor(edx, edx).unwrap();
    a.mov(rax, 1000u64).unwrap();
    a.div(rcx).unwrap();
    a.shl(rax, 40).unwrap();
    a.ror(rdx, 3).unwrap();
    a.lea(rsi, qword_ptr(rax + rdx * 4 + 0x10)).unwrap();
    a.push(rsi).unwrap();
    a.push(rax).unwrap();
    a.pop(r8).unwrap();
    a.pop(r9).unwrap();
    a.bswap(r9).unwrap();
    a.sub(r8, r9).unwrap();
    a.setc(r10b).unwrap();
    // Port I/O of all three sizes.
    a.mov(dx, 0x510).unwrap();
    a.mov(eax, 0xcafe_f00du32).unwrap();
    a.out(dx, eax).unwrap();
    a.out(dx, ax).unwrap();
    a.in_(eax, dx).unwrap();
    a.mov(r11, rax).unwrap();
    // MMIO: 8-byte write and 4-byte read above RAM.
    a.mov(rdi, MMIO).unwrap();
    a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
    a.mov(qword_ptr(rdi + 8), rax).unwrap();
    a.mov(r12d, dword_ptr(rdi + 0x10)).unwrap();
    // A string op on RAM.
    a.mov(rdi, DATA + 0x100).unwrap();
    a.mov(rcx, 16u64).unwrap();
    a.mov(al, 0xab).unwrap();
    a.rep().stosb().unwrap();
    a.pushfq().unwrap();
    a.pop(r13).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();

    let mut start = CpuState::long_mode_flat(PML4);
    start.rip = CODE;
    start.gpr[4] = 0x8000;
    let tables = page_tables()
        .into_iter()
        .map(|(addr, v)| (addr, v.to_le_bytes().to_vec()))
        .collect();
    let out = compare(start, code, tables, &[0x7654_3210]);
    assert_eq!(out.state.gpr[11], 0x7654_3210);
    assert_eq!(out.io_writes, vec![(0x510, 4, 0xcafe_f00d), (0x510, 2, 0xf00d)]);
    assert_eq!(
        out.mmio_writes,
        vec![(MMIO + 8, 0x1122_3344_5566_7788u64.to_le_bytes().to_vec())]
    );
    assert_eq!(out.state.gpr[12], 0xffff_ffff);
}

#[test]
fn state_read_back_from_kvm_round_trips() {
    require_kvm();
    // What KVM reports for a state we set converts back to the same state.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let vm = KvmVm::new(&mem, VmOptions { irqchip: false }).unwrap();
    let vcpu = vm.create_vcpu(0, 1).unwrap();
    let mut s = CpuState::long_mode_flat(PML4);
    s.rip = CODE;
    for (i, g) in s.gpr.iter_mut().enumerate() {
        *g = 0x0101_0101_0101_0101 * (i as u64 + 1);
    }
    s.rflags = flags::FIXED1 | flags::CF | flags::ZF;
    s.msr.lstar = 0xffff_ffff_8100_0000;
    s.msr.star = 0x0023_0010_0000_0000;
    s.msr.kernel_gs_base = 0x5000;
    s.fpu.xmm[3] = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10;
    s.fpu.mxcsr = 0x1fa0;
    s.fpu.fcw = 0x027f;
    vcpu.set_state(&s, 0).unwrap();
    let back = vcpu.get_state(0, &[]).unwrap();
    assert_eq!(back.gpr, s.gpr);
    assert_eq!(back.rip, s.rip);
    assert_eq!(back.rflags, s.rflags);
    assert_eq!(back.cr3, s.cr3);
    assert_eq!(back.efer, s.efer);
    assert!(back.segs[1].l);
    assert_eq!(back.msr.lstar, s.msr.lstar);
    assert_eq!(back.msr.star, s.msr.star);
    assert_eq!(back.msr.kernel_gs_base, s.msr.kernel_gs_base);
    assert_eq!(back.fpu.xmm, s.fpu.xmm);
    // PVM-type KVM (module kvm_pvm) hands back MXCSR as 0 through
    // KVM_GET_FPU; ordinary KVM returns what was set.
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(back.fpu.mxcsr, s.fpu.mxcsr);
    }
    assert_eq!(back.fpu.fcw, s.fpu.fcw);
    // And KVM's own answer is a fixed point of the conversion.
    vcpu.set_state(&back, 0).unwrap();
    let again = vcpu.get_state(0, &[]).unwrap();
    let mut a = again.clone();
    let mut b = back.clone();
    // The TSC moves between the two reads.
    a.msr.tsc_offset = 0;
    b.msr.tsc_offset = 0;
    assert_eq!(a, b);
}

#[test]
fn triple_fault_ends_with_the_registers() {
    require_kvm();
    // An empty IDT: the breakpoint cannot be delivered, nor the #GP that
    // follows, nor the double fault. Both engines must see a triple fault.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x1234_5678u64).unwrap();
    a.lidt(ptr(DATA)).unwrap();
    a.int3().unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut start = CpuState::long_mode_flat(PML4);
    start.rip = CODE;
    start.gpr[4] = 0x8000;
    let mut image: Vec<(u64, Vec<u8>)> = page_tables()
        .into_iter()
        .map(|(addr, v)| (addr, v.to_le_bytes().to_vec()))
        .collect();
    image.push((CODE, code));
    image.push((DATA, vec![0; 10])); // limit 0, base 0

    let mut bus = TestBus::new(RAM);
    for (addr, bytes) in &image {
        bus.load(*addr, bytes);
    }
    let mut cpu = Cpu::new(CpuConfig::default(), Arc::new(CodeMap::new(RAM)));
    cpu.set_state(start.clone());
    assert_eq!(cpu.run(&mut bus, 1000), Exit::TripleFault);

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    for (addr, bytes) in &image {
        mem.write_slice(bytes, GuestAddress(*addr)).unwrap();
    }
    let vm = KvmVm::new(&mem, VmOptions { irqchip: false }).unwrap();
    let mut vcpu = vm.create_vcpu(0, 1).unwrap();
    vcpu.set_state(&start, 0).unwrap();
    let mut kbus = TestBus::new(0x1000);
    let step = (0..100)
        .map(|_| vcpu.run_once(&mut kbus))
        .find(|s| !matches!(s, Step::Continue | Step::Interrupted))
        .expect("the vCPU kept running");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    match step {
        Step::TripleFault(regs) => {
            assert!(regs.contains("vcpu0:") && regs.contains("rax=0x12345678"), "{regs}");
        }
        // PVM-type KVM runs this payload in KVM's instruction emulator,
        // which gives up on the undeliverable breakpoint instead: the
        // engine must still end with a clear message and the registers.
        Step::Fault(msg) if pvm => {
            assert!(
                msg.contains("KVM internal error") && msg.contains("rax=0x12345678"),
                "{msg}"
            );
        }
        other => panic!("expected a triple fault, got {other:?}"),
    }
}

/// Issue 14, hole 4: string I/O (`rep outs`/`rep ins`) under kvm moved only
/// its first element, and 256 bytes or more wrapped the length to a byte.
/// Every element must reach the device, in order, at its own width.
#[test]
fn string_port_io_moves_every_element() {
    let mut a = CodeAssembler::new(64).unwrap();
    a.cld().unwrap();
    a.mov(dx, 0x3f8).unwrap();
    a.mov(rsi, DATA).unwrap();
    a.mov(rcx, 300u64).unwrap();
    a.rep().outsb().unwrap();
    a.mov(dx, 0x510).unwrap();
    a.mov(rcx, 3u64).unwrap();
    a.rep().outsw().unwrap();
    a.mov(rcx, 2u64).unwrap();
    a.rep().outsd().unwrap();
    a.mov(rdi, DATA + 0x800).unwrap();
    a.mov(dx, 0x511).unwrap();
    a.mov(rcx, 260u64).unwrap();
    a.rep().insb().unwrap();
    a.mov(rcx, 3u64).unwrap();
    a.rep().insw().unwrap();
    a.mov(rcx, 2u64).unwrap();
    a.rep().insd().unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut start = CpuState::long_mode_flat(PML4);
    start.rip = CODE;
    start.gpr[4] = 0x8000;
    let mut image: Vec<(u64, Vec<u8>)> = page_tables()
        .into_iter()
        .map(|(addr, v)| (addr, v.to_le_bytes().to_vec()))
        .collect();
    let data: Vec<u8> = (0..0x400u32).map(|i| (i % 251) as u8).collect();
    image.push((DATA, data.clone()));
    let reads: Vec<u32> = (0..265u32).map(|i| 0x1000_0000 + i * 0x0101).collect();
    let out = compare(start, code, image, &reads);

    let mut want: Vec<(u16, u8, u32)> = data[..300].iter().map(|&b| (0x3f8, 1, u32::from(b))).collect();
    for w in data[300..306].chunks(2) {
        want.push((0x510, 2, u32::from(u16::from_le_bytes([w[0], w[1]]))));
    }
    for d in data[306..314].chunks(4) {
        want.push((0x510, 4, u32::from_le_bytes([d[0], d[1], d[2], d[3]])));
    }
    assert_eq!(out.io_writes.len(), want.len(), "elements written");
    assert_eq!(out.io_writes, want);
    let base = (DATA + 0x800) as usize;
    let mut expect = Vec::new();
    expect.extend(reads[..260].iter().map(|&v| v as u8));
    for &v in &reads[260..263] {
        expect.extend_from_slice(&(v as u16).to_le_bytes());
    }
    for &v in &reads[263..265] {
        expect.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(&out.ram[base..base + expect.len()], &expect[..], "bytes read in");
}

/// Issue 14, hole 8 under kvm: an AP that was never started (as with
/// `nosmp`) counts as done for the all-vCPUs-halted power-off, and a BSP
/// that runs does not.
#[test]
fn a_never_started_ap_counts_as_halted_for_good() {
    require_kvm();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let vm = KvmVm::new(&mem, VmOptions { irqchip: true }).expect("KVM VM with an in-kernel irqchip");
    let bsp = vm.create_vcpu(0, 2).unwrap();
    let ap = vm.create_vcpu(1, 2).unwrap();
    let mut s = CpuState::long_mode_flat(PML4);
    s.rip = CODE;
    bsp.set_state(&s, 0).unwrap();
    assert!(ap.halted_for_good(), "an AP waiting for its SIPI runs nothing");
    assert!(!bsp.halted_for_good(), "a runnable BSP is not done");
}

/// Where KVM scales the TSC, a vCPU's TSC runs at the machine's rate (as
/// under emu), so a guest keeps its clock's rate across engines; where it
/// does not, the VM still builds and the vCPU reports the host's rate.
#[test]
fn vcpu_tsc_runs_at_the_machine_rate_where_kvm_scales_it() {
    require_kvm();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let vm = KvmVm::new(&mem, VmOptions { irqchip: true }).expect("KVM VM with an in-kernel irqchip");
    let vcpu = vm.create_vcpu(0, 1).unwrap();
    let khz = vcpu.tsc_khz().expect("KVM_GET_TSC_KHZ");
    if vm.tsc_scaling() {
        assert_eq!(khz, vmm::machine::TSC_KHZ, "KVM scales the TSC here");
    } else {
        eprintln!("no TSC scaling here: the vCPU's TSC runs at the host's {khz} kHz");
        assert!(khz > 0, "the host's TSC rate");
    }
}
