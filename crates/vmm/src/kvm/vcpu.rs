//! One KVM vCPU: its state as x86emu's `CpuState`, and `KVM_RUN` with the
//! port and MMIO exits handed to an `x86emu::Bus`.

use kvm_bindings::{
    kvm_lapic_state, kvm_msr_entry, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use x86emu::state::CpuState;
use x86emu::Bus;

use super::state::{self, KvmVcpuState};
use super::KvmError;

/// LAPIC register offsets in `kvm_lapic_state`.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
/// Where port I/O data sits in the kvm_run mapping, in pages
/// (KVM_PIO_PAGE_OFFSET in the kernel's x86 uapi).
const PIO_PAGE_OFFSET: usize = 1;

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system; no memory is touched.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// MSRs beyond those `CpuState` names that a snapshot under kvm keeps (in
/// `msr.other`): the MTRRs, KVM's paravirtual MSRs (kvmclock, async page
/// faults, steal time, PV EOI, poll control) and the TSC deadline. Those
/// KVM does not know are left out when read.
pub const SNAPSHOT_MSRS: &[u32] = &[
    0x2ff,
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207,
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f,
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,
    0x11,
    0x12,
    0x4b56_4d00,
    0x4b56_4d01,
    0x4b56_4d02,
    0x4b56_4d03,
    0x4b56_4d04,
    0x4b56_4d05,
    0x4b56_4d06,
    0x6e0,
];

/// Whether KVM takes MSR `index` from a snapshot's `msr.other` (those of
/// [`SNAPSHOT_MSRS`]); emu keeps a few more it only stores (feature
/// control, microcode revision, MCG status, DEBUGCTL), which KVM answers
/// for itself.
pub fn restores_msr(index: u32) -> bool {
    SNAPSHOT_MSRS.contains(&index) && index != super::irqchip_state::MSR_TSC_DEADLINE
}

/// What one `KVM_RUN` came back with, after the bus handled any I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// I/O done (or a spurious exit): run again.
    Continue,
    /// HLT (only without the in-kernel irqchip; with it KVM waits itself).
    Halted,
    /// A signal or `immediate_exit` took the vCPU out of the guest.
    Interrupted,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`): the registers, formatted.
    TripleFault(String),
    /// The guest asked for a reset or power-off through a KVM system event.
    Reset,
    PowerOff,
    /// KVM could not run the guest (failed entry, internal error, crash):
    /// what happened and the registers.
    Fault(String),
}

pub struct KvmVcpu {
    pub id: u32,
    pub(crate) fd: VcpuFd,
    irqchip: bool,
}

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    u32::from_le_bytes([
        regs[off] as u8,
        regs[off + 1] as u8,
        regs[off + 2] as u8,
        regs[off + 3] as u8,
    ])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

impl KvmVcpu {
    pub(crate) fn new(id: u32, fd: VcpuFd, irqchip: bool) -> Self {
        KvmVcpu { id, fd, irqchip }
    }

    /// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware leaves them
    /// (the same virtual wire mode our emulated LAPIC starts in).
    pub(crate) fn setup_lapic_virtual_wire(&self) -> Result<(), KvmError> {
        let mut lapic = self.fd.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?;
        let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
        set_lapic_reg(&mut lapic.regs, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
        let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
        set_lapic_reg(&mut lapic.regs, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
        self.fd.set_lapic(&lapic).map_err(KvmError::ioctl("KVM_SET_LAPIC"))
    }

    /// Load `s`. `time_base` is the machine's TSC time base now.
    pub fn set_state(&self, s: &CpuState, time_base: u64) -> Result<(), KvmError> {
        let k = state::to_kvm(s, time_base);
        let fd = &self.fd;
        fd.set_sregs(&k.sregs).map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&k.regs).map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        fd.set_fpu(&k.fpu).map_err(KvmError::ioctl("KVM_SET_FPU"))?;
        fd.set_xcrs(&k.xcrs).map_err(KvmError::ioctl("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&k.debugregs)
            .map_err(KvmError::ioctl("KVM_SET_DEBUGREGS"))?;
        let msrs = Msrs::from_entries(&k.msrs).map_err(|e| KvmError::Setup(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
        if n < k.msrs.len() {
            return Err(KvmError::Setup(format!(
                "KVM refused MSR {:#x} = {:#x}",
                k.msrs[n].index, k.msrs[n].data
            )));
        }
        fd.set_vcpu_events(&k.events)
            .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
        if self.irqchip {
            fd.set_mp_state(k.mp_state)
                .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// Read the vCPU's state (the vCPU must be out of `KVM_RUN`). `extra_msrs`
    /// are MSRs beyond those `CpuState` names, kept in `msr.other`.
    pub fn get_state(&self, time_base: u64, extra_msrs: &[u32]) -> Result<CpuState, KvmError> {
        let fd = &self.fd;
        let k = KvmVcpuState {
            regs: fd.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?,
            fpu: fd.get_fpu().map_err(KvmError::ioctl("KVM_GET_FPU"))?,
            debugregs: fd.get_debug_regs().map_err(KvmError::ioctl("KVM_GET_DEBUGREGS"))?,
            xcrs: fd.get_xcrs().map_err(KvmError::ioctl("KVM_GET_XCRS"))?,
            msrs: self.read_msrs(&state::msr_indices(extra_msrs))?,
            events: fd.get_vcpu_events().map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?,
            mp_state: if self.irqchip {
                fd.get_mp_state().map_err(KvmError::ioctl("KVM_GET_MP_STATE"))?
            } else {
                Default::default()
            },
        };
        Ok(state::from_kvm(&k, time_base))
    }

    /// The LAPIC's register page (`KVM_GET_LAPIC`).
    pub fn get_lapic(&self) -> Result<kvm_lapic_state, KvmError> {
        self.fd.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))
    }

    /// The XSAVE area (`KVM_GET_XSAVE`): the x87/SSE state `CpuState` has
    /// and the AVX and later state it has no room for.
    pub fn get_xsave(&self) -> Result<Vec<u32>, KvmError> {
        let x = self.fd.get_xsave().map_err(KvmError::ioctl("KVM_GET_XSAVE"))?;
        Ok(x.region.to_vec())
    }

    /// After [`Self::set_state`]: the LAPIC page, then the TSC deadline
    /// (which counts in the TSC just set), then the XSAVE area when the
    /// snapshot came from KVM, then `s`'s events and MP state again
    /// (loaded last, as QEMU does, so the LAPIC load cannot undo them).
    pub fn set_platform_state(
        &self,
        s: &CpuState,
        lapic: &kvm_lapic_state,
        tsc_deadline: u64,
        xsave: Option<&[u32]>,
    ) -> Result<(), KvmError> {
        let fd = &self.fd;
        fd.set_lapic(lapic).map_err(KvmError::ioctl("KVM_SET_LAPIC"))?;
        if tsc_deadline != 0 {
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: super::irqchip_state::MSR_TSC_DEADLINE,
                data: tsc_deadline,
                ..Default::default()
            }])
            .map_err(|e| KvmError::Setup(format!("MSR list: {e:?}")))?;
            fd.set_msrs(&msrs).map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
        }
        if let Some(region) = xsave {
            let mut x = kvm_bindings::kvm_xsave::default();
            if region.len() != x.region.len() {
                return Err(KvmError::Setup(format!("an XSAVE area of {} words", region.len())));
            }
            x.region.copy_from_slice(region);
            // SAFETY: the kernel reads `sizeof(struct kvm_xsave)` (4 KiB)
            // from this pointer, all of which `x` is: this VM never enables
            // the larger XSAVE state (AMX) that KVM_SET_XSAVE2 would read
            // past it.
            unsafe { fd.set_xsave(&x) }.map_err(KvmError::ioctl("KVM_SET_XSAVE"))?;
        }
        let k = state::to_kvm(s, 0);
        fd.set_vcpu_events(&k.events)
            .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
        if self.irqchip {
            fd.set_mp_state(k.mp_state)
                .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// Read `indices`, leaving out the ones KVM does not know.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmError> {
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::Setup(format!("MSR list: {e:?}")))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
            out.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
            // KVM stops at the first MSR it does not know: skip it.
            rest = rest.get(n + 1..).unwrap_or(&[]);
        }
        Ok(out)
    }

    /// Whether the vCPU sits in HLT with interrupts off, or is an AP that
    /// waits for a SIPI (never started, as with `nosmp`, or sent INIT), in
    /// the in-kernel irqchip only: nothing but an NMI, INIT or SIPI can
    /// make it run.
    pub fn halted_for_good(&self) -> bool {
        if !self.irqchip {
            return false;
        }
        let Ok(mp) = self.fd.get_mp_state() else {
            return false;
        };
        match mp.mp_state {
            kvm_bindings::KVM_MP_STATE_INIT_RECEIVED | kvm_bindings::KVM_MP_STATE_UNINITIALIZED => self.id != 0,
            kvm_bindings::KVM_MP_STATE_HALTED => {
                matches!(self.fd.get_regs(), Ok(r) if r.rflags & x86emu::state::flags::IF == 0)
            }
            _ => false,
        }
    }

    /// The guest TSC's rate in kHz (`KVM_GET_TSC_KHZ`).
    pub fn tsc_khz(&self) -> Result<u32, KvmError> {
        self.fd.get_tsc_khz().map_err(KvmError::ioctl("KVM_GET_TSC_KHZ"))
    }

    /// Ask the next (or current) `KVM_RUN` to return at once.
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(on as u8);
    }

    /// One `KVM_RUN`, with port and MMIO exits handed to `bus`.
    pub fn run_once(&mut self, bus: &mut dyn Bus) -> Step {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Step::Interrupted,
            Err(e) => return Step::Fault(format!("KVM_RUN failed: {e}")),
        };
        match exit {
            // kvm-ioctls hands over `count * size` bytes and drops the
            // element size, so the exit is decoded from kvm_run itself.
            VcpuExit::IoIn(port, _) | VcpuExit::IoOut(port, _) => self.port_io(bus, port),
            VcpuExit::MmioRead(addr, data) => {
                bus.mmio_read(addr, data);
                Step::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                bus.mmio_write(addr, data);
                Step::Continue
            }
            VcpuExit::Hlt => Step::Halted,
            VcpuExit::Intr => Step::Interrupted,
            VcpuExit::IrqWindowOpen | VcpuExit::Unknown => Step::Continue,
            VcpuExit::Shutdown => Step::TripleFault(self.describe()),
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => Step::Reset,
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => Step::PowerOff,
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, _) => {
                Step::Fault(format!("the guest crashed: {}", self.describe()))
            }
            VcpuExit::SystemEvent(t, _) => Step::Fault(format!("unexpected system event {t}: {}", self.describe())),
            VcpuExit::FailEntry(reason, cpu) => Step::Fault(format!(
                "KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu}): {}",
                self.describe()
            )),
            VcpuExit::InternalError => {
                let sub = self.internal_suberror();
                Step::Fault(format!("KVM internal error ({sub}): {}", self.describe()))
            }
            other => {
                let what = format!("{other:?}");
                Step::Fault(format!("unexpected exit {what}: {}", self.describe()))
            }
        }
    }

    /// A port I/O exit: `count` elements of `size` bytes (string I/O,
    /// `rep ins/outs`, brings up to a page of them), each one an access of
    /// `size` bytes to the same port, in order.
    fn port_io(&mut self, bus: &mut dyn Bus, port: u16) -> Step {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_IO, so `io` is the union
        // member the kernel filled in.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let count = io.count as usize;
        let page = PIO_PAGE_OFFSET * page_size();
        if !matches!(size, 1 | 2 | 4) || count == 0 || size * count > page_size() || io.data_offset as usize != page {
            return Step::Fault(format!(
                "KVM port I/O exit with size {size}, count {count}, data at {:#x}: {}",
                io.data_offset,
                self.describe()
            ));
        }
        let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
        // SAFETY: KVM puts a port I/O exit's data in the page at
        // KVM_PIO_PAGE_OFFSET pages into the vCPU's kvm_run mapping (checked
        // above), which KVM_GET_VCPU_MMAP_SIZE always covers and which stays
        // mapped while `self.fd` lives. `size * count` fits in that page, and
        // nothing else refers to those bytes until the next KVM_RUN.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(page), size * count) };
        let input = u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN;
        for element in data.chunks_exact_mut(size) {
            if input {
                let v = bus.io_in(port, size as u8);
                element.copy_from_slice(&v.to_le_bytes()[..size]);
            } else {
                let mut b = [0u8; 4];
                b[..size].copy_from_slice(element);
                bus.io_out(port, size as u8, u32::from_le_bytes(b));
            }
        }
        Step::Continue
    }

    fn internal_suberror(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the union member the kernel filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
            _ => "unknown",
        };
        format!("suberror {}: {what}", internal.suberror)
    }

    /// The registers, for error reports (whatever KVM will tell).
    pub fn describe(&self) -> String {
        let mut out = format!("vcpu{}:", self.id);
        if let Ok(r) = self.fd.get_regs() {
            out.push_str(&format!(
                " rip={:#018x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rsp={:#x} rbp={:#x}",
                r.rip, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp
            ));
        }
        if let Ok(s) = self.fd.get_sregs() {
            out.push_str(&format!(
                " cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ));
        }
        out
    }
}
