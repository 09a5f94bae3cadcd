//! One KVM virtual machine: its memory slots, the in-kernel irqchip and
//! PIT, interrupt lines (irqfd) and doorbells (ioeventfd).

use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, CpuId,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vcpu::KvmVcpu;
use super::KvmError;
use crate::cpu_features::CpuFeatures;
use crate::devices::irq_line::InterruptLine;
use crate::machine::TSC_KHZ;

/// Where KVM may put the TSS and identity map it needs for real mode on
/// VMX: three pages plus one just below the 4 GiB firmware area.
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// How the VM is built.
#[derive(Clone, Copy, Debug)]
pub struct VmOptions {
    /// In-kernel LAPIC/IOAPIC/PIC and PIT (a full machine). Small test
    /// payloads run without them.
    pub irqchip: bool,
}

pub struct KvmVm {
    pub(crate) fd: Arc<VmFd>,
    /// Guest memory's slots, as registered (no flags).
    slots: Vec<kvm_userspace_memory_region>,
    supported_cpuid: CpuId,
    irqchip: bool,
    tsc_scaling: bool,
}

impl KvmVm {
    /// Open /dev/kvm and build a VM over `mem`. The caller keeps `mem` alive
    /// (and unresized) for as long as the VM exists.
    pub fn new(mem: &GuestMemoryMmap, opts: VmOptions) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::ioctl("opening /dev/kvm"))?;
        let fd = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        let mut slots = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| KvmError::Setup(format!("guest memory region: {e}")))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a mapping of `region.len()` bytes
            // owned by `mem`, which the caller keeps mapped while the VM lives.
            unsafe { fd.set_user_memory_region(r) }.map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
            slots.push(r);
        }
        if opts.irqchip {
            fd.set_tss_address(TSS_ADDR)
                .map_err(KvmError::ioctl("KVM_SET_TSS_ADDR"))?;
            // Only VMX uses it; SVM and PVM may refuse.
            let _ = fd.set_identity_map_address(IDENTITY_MAP_ADDR);
            fd.create_irq_chip().map_err(KvmError::ioctl("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(KvmError::ioctl("KVM_CREATE_PIT2"))?;
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_scaling = fd.check_extension(Cap::TscControl) && fd.check_extension(Cap::GetTscKhz);
        Ok(KvmVm {
            slots,
            tsc_scaling,
            fd: Arc::new(fd),
            supported_cpuid,
            irqchip: opts.irqchip,
        })
    }

    /// Create vCPU `id` of `count`, with its filtered CPUID.
    pub fn create_vcpu(&self, id: u32, count: u32) -> Result<KvmVcpu, KvmError> {
        self.create_vcpu_seeing(id, count, None)
    }

    /// The CPU features vCPUs of a machine of `count` see (with no mask).
    pub fn features(&self, count: u32) -> Result<CpuFeatures, KvmError> {
        let cpuid = super::cpuid::for_vcpu(&self.supported_cpuid, 0, count)?;
        Ok(features_of(&cpuid))
    }

    /// [`Self::create_vcpu`], its CPUID limited to the features `saw`
    /// (those a restored guest saw before), when given.
    pub fn create_vcpu_seeing(&self, id: u32, count: u32, saw: Option<&CpuFeatures>) -> Result<KvmVcpu, KvmError> {
        let fd = self
            .fd
            .create_vcpu(id as u64)
            .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
        let mut cpuid = super::cpuid::for_vcpu(&self.supported_cpuid, id, count)?;
        if let Some(saw) = saw {
            for e in cpuid.as_mut_slice() {
                let mut regs = [e.eax, e.ebx, e.ecx, e.edx];
                saw.mask(e.function, e.index, &mut regs);
                [e.eax, e.ebx, e.ecx, e.edx] = regs;
            }
        }
        fd.set_cpuid2(&cpuid).map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;
        if self.tsc_scaling {
            // The machine's TSC rate, as under emu, so a guest moved
            // between engines keeps its clock's rate.
            fd.set_tsc_khz(TSC_KHZ)
                .map_err(KvmError::ioctl("KVM_SET_TSC_KHZ (the machine's 2 GHz TSC)"))?;
        }
        let vcpu = KvmVcpu::new(id, fd, self.irqchip);
        if self.irqchip {
            vcpu.setup_lapic_virtual_wire()?;
        }
        Ok(vcpu)
    }

    /// Whether KVM scales the guest's TSC here (`KVM_CAP_TSC_CONTROL`): the
    /// vCPUs' TSC then runs at the machine's `TSC_KHZ`, as under emu;
    /// otherwise at the host's rate.
    pub fn tsc_scaling(&self) -> bool {
        self.tsc_scaling
    }

    /// The VM's file, for reading and loading its state while it runs
    /// (see [`get_vm_state`]).
    pub fn vm_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// The guest memory slots, for turning dirty logging on and off
    /// ([`DirtyLogSlots`]).
    pub fn dirty_log_slots(&self) -> DirtyLogSlots {
        DirtyLogSlots {
            fd: self.fd.clone(),
            slots: self.slots.clone(),
        }
    }

    /// An interrupt line into the in-kernel irqchip at `gsi` (irqfd).
    pub fn irq_line(&self, gsi: u32) -> Result<Arc<KvmIrqLine>, KvmError> {
        let event = EventFd::new(EFD_NONBLOCK).map_err(|e| KvmError::Setup(format!("eventfd: {e}")))?;
        self.fd
            .register_irqfd(&event, gsi)
            .map_err(KvmError::ioctl("KVM_IRQFD"))?;
        Ok(Arc::new(KvmIrqLine { event }))
    }

    /// Let guest writes to the MMIO address `addr` signal `event` inside the
    /// kernel, without an exit to the VMM (a virtio queue doorbell).
    pub fn register_mmio_doorbell(&self, event: &EventFd, addr: u64, value: u32) -> Result<(), KvmError> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), value)
            .map_err(KvmError::ioctl("KVM_IOEVENTFD"))
    }

    /// As [`Self::register_mmio_doorbell`], for any value written.
    pub fn register_mmio_doorbell_any(&self, event: &EventFd, addr: u64) -> Result<(), KvmError> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(KvmError::ioctl("KVM_IOEVENTFD"))
    }
}

/// KVM's dirty-page log over a VM's memory slots: `KVM_MEM_LOG_DIRTY_PAGES`
/// on each slot while logging (the slot is registered again with the
/// flag, and without it to stop: KVM allows changing only the flags of a
/// live slot), `KVM_GET_DIRTY_LOG` to read and clear it. KVM write-protects
/// the slot's pages when logging starts and again each time the log is
/// read (flushing the vCPUs' TLBs before the ioctl returns), so a page
/// written after a read shows in the next one.
pub struct DirtyLogSlots {
    fd: Arc<VmFd>,
    slots: Vec<kvm_userspace_memory_region>,
}

impl DirtyLogSlots {
    /// Turn logging on or off on every slot.
    pub fn set_logging(&self, on: bool) -> Result<(), KvmError> {
        for r in &self.slots {
            let r = kvm_userspace_memory_region {
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                ..*r
            };
            // SAFETY: the same slot over the same mapping as when the VM
            // was built (`KvmVm::new`), which the machine keeps mapped
            // while the VM lives; only the flags differ.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION (dirty logging)"))?;
        }
        Ok(())
    }

    /// Every page written since logging started or the last call, by its
    /// guest-physical address; KVM's log is cleared.
    pub fn collect(&self, mark: &mut dyn FnMut(u64)) -> Result<(), KvmError> {
        const PAGE: u64 = 4096;
        for r in &self.slots {
            let bitmap = self
                .fd
                .get_dirty_log(r.slot, r.memory_size as usize)
                .map_err(KvmError::ioctl("KVM_GET_DIRTY_LOG"))?;
            let pages = r.memory_size / PAGE;
            for (i, &word) in bitmap.iter().enumerate() {
                let mut w = word;
                while w != 0 {
                    let page = i as u64 * 64 + u64::from(w.trailing_zeros());
                    w &= w - 1;
                    // KVM sets no bit past the slot; should it, ignore it.
                    if page < pages {
                        mark(r.guest_phys_addr + page * PAGE);
                    }
                }
            }
        }
        Ok(())
    }
}

/// What the VM (not a vCPU) holds: the in-kernel PIC pair and IOAPIC, the
/// PIT, and the kvmclock's time.
#[derive(Clone, Copy)]
pub struct VmIrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The in-kernel PIC pair, IOAPIC, PIT and clock of the VM `fd` (its
/// vCPUs out of `KVM_RUN`).
pub fn get_vm_state(fd: &VmFd) -> Result<VmIrqchipState, KvmError> {
    let chip = |chip_id| -> Result<kvm_irqchip, KvmError> {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut c).map_err(KvmError::ioctl("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    Ok(VmIrqchipState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(KvmError::ioctl("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(KvmError::ioctl("KVM_GET_CLOCK"))?,
    })
}

/// Load what [`get_vm_state`] read (the clock's time only).
pub fn set_vm_state(fd: &VmFd, s: &VmIrqchipState) -> Result<(), KvmError> {
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        fd.set_irqchip(c).map_err(KvmError::ioctl("KVM_SET_IRQCHIP"))?;
    }
    fd.set_pit2(&s.pit).map_err(KvmError::ioctl("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(KvmError::ioctl("KVM_SET_CLOCK"))
}

/// The compared CPU features of a vCPU's CPUID.
pub fn features_of(cpuid: &CpuId) -> CpuFeatures {
    let entries = cpuid.as_slice();
    CpuFeatures::from_cpuid(|leaf, sub| {
        entries
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0))
            .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
    })
}

/// A device interrupt through an irqfd: one eventfd write is one edge.
pub struct KvmIrqLine {
    event: EventFd,
}

impl InterruptLine for KvmIrqLine {
    fn trigger(&self) {
        // The counter saturating (EAGAIN) still leaves the interrupt pending.
        let _ = self.event.write(1);
    }
}
