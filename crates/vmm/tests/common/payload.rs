//! What the kvm payload tests share: a small program run as a machine's
//! "kernel" (an ELF loaded as Linux's would be), its console output, and
//! the host's KVM. The host's PVM-type KVM runs such payloads (it cannot
//! run Linux).

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm::cpu_features::CpuFeatures;
use vmm::machine::{ConsoleInput, Machine, RunOutcome, VmHandle};

/// The payloads' checksum: r = r * MUL + ADD from SEED.
pub const SEED: u64 = 0x0123_4567_89ab_cdef;
pub const MUL: u64 = 6_364_136_223_846_793_005;
pub const ADD: u64 = 1_442_695_040_888_963_407;
/// Where a payload is loaded and entered.
pub const LOAD: u64 = 0x10_0000;

/// Fail, saying what is missing, where /dev/kvm cannot be opened.
pub fn require_kvm() {
    if let Err(e) = kvm_ioctls::Kvm::new() {
        panic!(
            "this test needs the host's KVM, and /dev/kvm cannot be opened: {e}. \
             Run it on a host (or in a VM) with KVM and read-write access to /dev/kvm."
        );
    }
}

/// The checksum after `n` steps.
pub fn checksum(n: u64) -> u64 {
    (0..n).fold(SEED, |r, _| r.wrapping_mul(MUL).wrapping_add(ADD))
}

/// A minimal ELF64 executable with `code` loaded and entered at [`LOAD`].
pub fn elf(code: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    let phoff = 64u64;
    let off = 0x1000u64;
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // entry
    f.extend_from_slice(&phoff.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // no sections
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    // PT_LOAD, R+X.
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&5u32.to_le_bytes());
    for v in [off, LOAD, LOAD, code.len() as u64, code.len() as u64, 0x1000] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.resize(off as usize, 0);
    f.extend_from_slice(code);
    f
}

#[derive(Clone, Default)]
pub struct Output(pub Arc<Mutex<Vec<u8>>>);

impl Write for Output {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Running {
    pub vm: VmHandle,
    pub input: ConsoleInput,
    pub out: Output,
    pub thread: std::thread::JoinHandle<RunOutcome>,
}

pub fn start(m: Machine, out: Output) -> Running {
    let vm = m.vm_handle();
    let input = m.input_handle();
    let thread = std::thread::spawn(move || m.run());
    Running { vm, input, out, thread }
}

/// What the host's KVM offers a one-vCPU machine.
pub fn kvm_features() -> CpuFeatures {
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    let vm = vmm::kvm::vm::KvmVm::new(&mem, vmm::kvm::vm::VmOptions { irqchip: true }).unwrap();
    vm.features(1).unwrap()
}
