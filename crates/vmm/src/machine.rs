//! The machine: guest memory, the devices on the port and MMIO buses, the
//! interrupt router, and the engine (`emu` or `kvm`) that runs the vCPUs.

use std::io::Write;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use x86emu::{Bus, CodeMap};

use crate::acpi::{self, VirtioSlot};
use crate::boot::{self, BootSpec};
use crate::devices::acpi_pm::{self, PowerAction};
use crate::devices::i8042::{self, I8042};
use crate::devices::irq::{InterruptRouter, Interrupts};
use crate::devices::irq_line::{EmuLine, InterruptLine};
use crate::devices::mptable;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{SerialPort, COM1_BASE, COM1_IRQ};
pub use crate::emu::format_regs;
use crate::emu::EmuEngine;
use crate::engine::{Control, Engine, EngineKind};
use crate::memory;
use crate::virtio::console::Console;
use crate::virtio::net::{random_mac, Net};
use crate::virtio::tap::Tap;
use crate::virtio::{self, blk::Block, mmio::MmioTransport, rng::Rng, Interrupt, VirtioDevice};
use crate::{Error, Result};

/// Guest TSC rate, advertised through CPUID.
pub const TSC_KHZ: u32 = 2_000_000;
/// The guest TSC at machine time `now_ns`: `now_ns * TSC_KHZ / 10^6`, in
/// 128 bits so it never saturates (a 64-bit product did at 2 h 34 min and
/// the guest's clock stopped). It wraps at 2^64 like a real TSC, after
/// 292 years at 2 GHz.
pub fn guest_tsc(now_ns: u64) -> u64 {
    (u128::from(now_ns) * u128::from(TSC_KHZ) / 1_000_000) as u64
}

/// Most vCPUs a machine may have.
pub const MAX_CPUS: u32 = 64;

/// What to run.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_size: u64,
    pub cpus: u32,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// Offer a virtio-rng device fed by the host's getrandom.
    pub rng: bool,
    /// A virtio-console (`/dev/hvc0`) whose output goes to this file.
    pub console_output: Option<PathBuf>,
    /// The largest that file may grow (what it held before counts); guest
    /// output beyond it is dropped and counted.
    /// [`crate::virtio::console::DEFAULT_OUTPUT_LIMIT`] is 64 MiB.
    pub console_output_limit: u64,
}

/// A virtio-blk disk.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Follow qcow2 backing-file names that are absolute or contain `..`
    /// (by default only names relative to the image, inside its folder).
    pub allow_absolute_backing: bool,
    /// The image's format. `None`: from the file name (`.qcow2` is qcow2,
    /// anything else raw, and then guest writes may not make its first
    /// sector look like an image format); never from the file's contents.
    pub format: Option<disk::ImageFormat>,
}

/// A virtio-net device on a TAP interface.
#[derive(Clone, Debug, Default)]
pub struct NetConfig {
    /// The TAP interface: opened if it exists, created if Vessel may
    /// (CAP_NET_ADMIN). None: the kernel picks a name.
    pub tap: Option<String>,
    pub mac: Option<[u8; 6]>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`);
    /// with no ACPI this is how our guests power off, as in Firecracker.
    Reset,
    /// The guest powered off through ACPI (S5 in the sleep control
    /// register), or every vCPU halted with interrupts disabled: without
    /// ACPI this is how Linux powers off ("reboot: System halted").
    PowerOff,
    /// A triple fault: the vCPU's registers at the time, formatted.
    TripleFault(String),
    /// The engine could not run the guest (KVM: failed entry, internal
    /// error): what happened and the vCPU's registers.
    Fault(String),
}

pub(crate) const RUNNING: u8 = 0;
pub(crate) const STOP_RESET: u8 = 1;
pub(crate) const STOP_TRIPLE: u8 = 2;
pub(crate) const STOP_HALTED: u8 = 3;
pub(crate) const STOP_FAULT: u8 = 4;

/// Devices behind one lock: the serial port, the i8042 and the RTC.
pub struct Platform {
    pub serial: SerialPort<Box<dyn Write + Send>>,
    pub i8042: I8042,
    pub rtc: Rtc,
}

/// State shared by the vCPU threads (opaque outside this crate).
pub struct Shared {
    pub(crate) mem: GuestMemoryMmap,
    /// Our interrupt controllers (used by `emu`; under `kvm` the kernel's serve).
    pub(crate) irqs: Arc<Interrupts>,
    pub(crate) platform: Mutex<Platform>,
    /// The serial port's IRQ 4, into whichever interrupt controller runs.
    pub(crate) serial_line: Arc<dyn InterruptLine>,
    /// Kicking and pausing the vCPUs, whatever the engine.
    pub(crate) control: Control,
    pub(crate) start: Instant,
    pub(crate) stop: AtomicU8,
    /// Why the guest stopped (triple fault or engine fault): the registers.
    pub(crate) triple_fault: Mutex<Option<String>>,
    /// vCPUs halted with IF=0 (a guest that is off for good).
    pub(crate) dead: std::sync::atomic::AtomicU32,
    /// virtio-mmio devices, device i at `virtio::MMIO_BASE + i * MMIO_SIZE`.
    pub(crate) virtio: Vec<Mutex<MmioTransport>>,
}

impl Shared {
    pub(crate) fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn platform(&self) -> MutexGuard<'_, Platform> {
        self.platform.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The UART raised its interrupt: an edge on IRQ 4. Called with the
    /// platform lock held (lock order: platform, then interrupts).
    fn serial_irq(&self, p: &mut Platform) {
        if p.serial.irq.0.swap(false, Ordering::AcqRel) {
            self.serial_line.trigger();
        }
    }

    /// The virtio-mmio device whose window holds `gpa`, and the offset.
    fn virtio_at(&self, gpa: u64) -> Option<(MutexGuard<'_, MmioTransport>, u64)> {
        let rel = gpa.checked_sub(virtio::MMIO_BASE)?;
        let dev = self.virtio.get((rel / virtio::MMIO_SIZE) as usize)?;
        Some((dev.lock().unwrap_or_else(|e| e.into_inner()), rel % virtio::MMIO_SIZE))
    }

    pub(crate) fn request_stop(&self, why: u8) {
        let _ = self
            .stop
            .compare_exchange(RUNNING, why, Ordering::AcqRel, Ordering::Acquire);
        for cpu in 0..self.irqs.num_cpus() {
            self.irqs.kick(cpu);
        }
        self.control.kick();
    }

    /// End the machine because the engine cannot go on (`msg` says why).
    pub(crate) fn fail(&self, msg: String) {
        let mut slot = self.triple_fault.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(msg);
        drop(slot);
        self.request_stop(STOP_FAULT);
    }

    /// How the run ended, once every vCPU thread is done.
    pub(crate) fn outcome(&self) -> RunOutcome {
        let why = || {
            self.triple_fault
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default()
        };
        match self.stop.load(Ordering::Acquire) {
            STOP_TRIPLE => RunOutcome::TripleFault(why()),
            STOP_FAULT => RunOutcome::Fault(why()),
            STOP_HALTED => RunOutcome::PowerOff,
            _ => RunOutcome::Reset,
        }
    }
}

/// One vCPU's view of the machine.
pub(crate) struct VcpuBus {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
}

// SAFETY: `ram_page` returns pointers into the mmap'd regions of the guest
// memory, which the `Shared` (kept alive by this bus's Arc) owns and never
// unmaps or resizes while the machine exists; a returned page lies wholly
// inside one region (checked against the region length).
unsafe impl Bus for VcpuBus {
    fn ram_page(&mut self, gpa: u64) -> Option<NonNull<u8>> {
        let region = self.shared.mem.find_region(GuestAddress(gpa))?;
        let off = gpa - region.start_addr().0;
        if off + x86emu::bus::PAGE_SIZE > region.len() {
            return None;
        }
        let host = region.get_host_address(MemoryRegionAddress(off)).ok()?;
        NonNull::new(host)
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        if let Some((mut dev, offset)) = self.shared.virtio_at(gpa) {
            return dev.read(offset, data);
        }
        let now = self.shared.now_ns();
        let id = self.id;
        if !self.shared.irqs.with(|r| r.mmio_read(id, gpa, data, now)) {
            data.fill(0xff);
        }
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        if let Some((mut dev, offset)) = self.shared.virtio_at(gpa) {
            return dev.write(offset, data);
        }
        let now = self.shared.now_ns();
        let id = self.id;
        self.shared.irqs.with(|r| r.mmio_write(id, gpa, data, now));
    }

    /// Every port device is byte-wide: a 16- or 32-bit access is byte
    /// accesses to consecutive ports, as on the ISA bus (and in QEMU).
    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        (0..size.clamp(1, 4)).fold(0, |v, i| {
            v | (u32::from(self.io_in_byte(port.wrapping_add(u16::from(i)))) << (8 * i))
        })
    }

    fn io_out(&mut self, port: u16, size: u8, value: u32) {
        for (i, b) in value
            .to_le_bytes()
            .into_iter()
            .take(size.clamp(1, 4).into())
            .enumerate()
        {
            self.io_out_byte(port.wrapping_add(i as u16), b);
        }
    }

    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        if InterruptRouter::handles_msr(index) {
            let now = self.shared.now_ns();
            let id = self.id;
            return self.shared.irqs.with(|r| r.rdmsr(id, index, now));
        }
        None
    }

    fn wrmsr(&mut self, index: u32, value: u64) -> bool {
        if InterruptRouter::handles_msr(index) {
            let now = self.shared.now_ns();
            let tsc = self.tsc(0);
            let id = self.id;
            return self.shared.irqs.with(|r| r.wrmsr(id, index, value, now, tsc));
        }
        false
    }

    fn tsc(&mut self, _instret: u64) -> u64 {
        guest_tsc(self.shared.now_ns())
    }

    fn interrupt_pending(&mut self) -> bool {
        let now = self.shared.now_ns();
        self.shared.irqs.tick(self.id, now);
        self.shared.irqs.interrupt_pending(self.id)
    }

    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        self.shared.irqs.acknowledge(self.id)
    }

    fn set_task_priority(&mut self, tpr: u8) {
        let id = self.id;
        self.shared.irqs.with(|r| r.set_task_priority(id, tpr as u64));
    }

    fn exit_requested(&mut self) -> bool {
        self.shared.stop.load(Ordering::Acquire) != RUNNING
            || self.shared.irqs.events_pending(self.id)
            || self.shared.control.pause_requested()
    }
}

impl VcpuBus {
    /// One byte from a port device (0xff from no device).
    fn io_in_byte(&mut self, port: u16) -> u8 {
        let now = self.shared.now_ns();
        match port {
            COM1_BASE..=0x3ff => {
                let mut p = self.shared.platform();
                let v = p.serial.read(port);
                self.shared.serial_irq(&mut p);
                v
            }
            i8042::DATA_PORT | i8042::STATUS_PORT => self.shared.platform().i8042.read(port),
            0x70 | 0x71 => self.shared.platform().rtc.read(port, now),
            p if acpi_pm::handles(p) => acpi_pm::read(p),
            _ => self.shared.irqs.with(|r| r.io_read(port, now)).unwrap_or(0xff),
        }
    }

    fn io_out_byte(&mut self, port: u16, value: u8) {
        let now = self.shared.now_ns();
        match port {
            COM1_BASE..=0x3ff => {
                let mut p = self.shared.platform();
                p.serial.write(port, value);
                self.shared.serial_irq(&mut p);
            }
            i8042::DATA_PORT | i8042::STATUS_PORT => {
                let mut p = self.shared.platform();
                p.i8042.write(port, value);
                if p.i8042.reset_requested {
                    drop(p);
                    self.shared.request_stop(STOP_RESET);
                }
            }
            0x70 | 0x71 => self.shared.platform().rtc.write(port, value, now),
            p if acpi_pm::handles(p) => match acpi_pm::action(p, value) {
                PowerAction::PowerOff => self.shared.request_stop(STOP_HALTED),
                PowerAction::Reset => self.shared.request_stop(STOP_RESET),
                PowerAction::None => {}
            },
            _ => {
                self.shared.irqs.with(|r| r.io_write(port, value, now));
            }
        }
    }
}

pub struct Machine {
    shared: Arc<Shared>,
    engine: Box<dyn Engine>,
}

impl Machine {
    /// Build the machine under `emu` and load the guest.
    pub fn new(cfg: &MachineConfig, console: Box<dyn Write + Send>) -> Result<Self> {
        Self::with_engine(cfg, console, EngineKind::Emu)
    }

    /// Build the machine with its vCPUs run by `engine` and load the guest.
    /// Errors are the user's to fix (bad kernel, memory size, CPU count, no
    /// usable KVM).
    pub fn with_engine(cfg: &MachineConfig, console: Box<dyn Write + Send>, engine: EngineKind) -> Result<Self> {
        if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
            return Err(Error::Config(format!(
                "--cpus must be between 1 and {MAX_CPUS}, not {}",
                cfg.cpus
            )));
        }
        let mem = memory::create(cfg.mem_size)?;
        let mut router = InterruptRouter::new(cfg.cpus as usize, TSC_KHZ as u64 * 1000);
        router.setup_virtual_wire();
        let irqs = Arc::new(Interrupts::new(router));
        let code_map = Arc::new(CodeMap::new(mem.last_addr().0 + 1));
        // The engine's interrupt controller: device lines go to our IOAPIC
        // under emu, to the kernel's through irqfd under kvm.
        let kvm = match engine {
            EngineKind::Emu => None,
            EngineKind::Kvm => Some(crate::kvm::engine::KvmEngine::new(&mem, cfg.cpus)?),
        };
        let lines = |pin: u32| -> Result<Arc<dyn InterruptLine>> {
            match &kvm {
                None => Ok(Arc::new(EmuLine {
                    irqs: irqs.clone(),
                    pin,
                })),
                Some(k) => k.irq_line(pin),
            }
        };
        // Device writes to guest memory must drop x86emu's cached decoded
        // code there; under kvm nothing caches code, so nobody listens.
        let dma: virtio::DmaObserver = match kvm {
            None => {
                let code_map = code_map.clone();
                Arc::new(move |gpa, len| code_map.invalidate_range(gpa, len))
            }
            Some(_) => virtio::no_dma_observer(),
        };
        let devices = create_virtio_devices(cfg, &mem, &lines, &dma)?;
        // Where each device sits: one window and one IOAPIC pin per device.
        let slots: Vec<VirtioSlot> = (0..devices.len())
            .map(|i| VirtioSlot {
                base: virtio::MMIO_BASE + i as u64 * virtio::MMIO_SIZE,
                size: virtio::MMIO_SIZE,
                gsi: virtio::FIRST_IRQ + i as u32,
            })
            .collect();
        // For kernels built with VIRTIO_MMIO_CMDLINE_DEVICES; ACPI
        // describes the same devices (LNRO0005 nodes) to the others, and
        // the MP table serves kernels without ACPI.
        let mut cmdline = cfg.cmdline.clone();
        for slot in &slots {
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", slot.base, slot.gsi));
        }
        let rsdp = acpi::setup_acpi(&mem, cfg.cpus as u8, &slots)?;
        let boot_state = boot::load(
            &mem,
            &BootSpec {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: &cmdline,
                mem_size: cfg.mem_size,
                acpi_rsdp: Some(rsdp.0),
            },
        )?;
        mptable::setup_mptable(&mem, cfg.cpus as u8).map_err(|e| Error::Memory(format!("MP table: {e}")))?;
        let serial_line = lines(COM1_IRQ)?;
        let engine: Box<dyn Engine> = match kvm {
            None => Box::new(EmuEngine::new(cfg.cpus, code_map, &boot_state)),
            Some(mut k) => {
                k.set_boot_state(&boot_state)?;
                // Queue notifications reach the devices' eventfds inside the
                // kernel, without an exit (ioeventfd).
                for (dev, slot) in devices.iter().zip(&slots) {
                    for (q, evt) in dev.notifiers().iter().enumerate() {
                        k.vm().register_mmio_doorbell(
                            evt,
                            slot.base + virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64,
                            q as u32,
                        )?;
                    }
                }
                Box::new(k)
            }
        };
        let shared = Arc::new(Shared {
            mem,
            irqs,
            platform: Mutex::new(Platform {
                serial: SerialPort::new(console),
                i8042: I8042::default(),
                rtc: Rtc::new(0),
            }),
            serial_line,
            control: Control::default(),
            start: Instant::now(),
            stop: AtomicU8::new(RUNNING),
            triple_fault: Mutex::new(None),
            dead: std::sync::atomic::AtomicU32::new(0),
            virtio: devices.into_iter().map(Mutex::new).collect(),
        });
        Ok(Machine { shared, engine })
    }

    /// The engine that runs the vCPUs.
    pub fn engine(&self) -> EngineKind {
        self.engine.kind()
    }

    /// A handle that can feed console input while `run` blocks.
    pub fn input_handle(&self) -> ConsoleInput {
        ConsoleInput {
            shared: self.shared.clone(),
        }
    }

    /// A handle that can pause and resume the VM while `run` blocks.
    pub fn vm_handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
        }
    }

    /// Run all vCPUs until the guest ends.
    pub fn run(self) -> RunOutcome {
        self.engine.run(self.shared)
    }
}

/// Pauses and resumes a running VM.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<Shared>,
}

impl VmHandle {
    /// Take every vCPU out of guest code and hold it there. `false` when
    /// not all vCPUs stopped within `timeout` (they stop later).
    pub fn pause(&self, timeout: Duration) -> bool {
        self.shared.control.pause(timeout)
    }

    pub fn resume(&self) {
        self.shared.control.resume();
    }

    /// While paused: each vCPU's state, as x86emu's `CpuState` under both
    /// engines (`None` for a vCPU whose state could not be read).
    pub fn vcpu_states(&self) -> Vec<Option<x86emu::CpuState>> {
        self.shared.control.vcpu_states()
    }

    /// Whether the VM is paused with every vCPU out of guest code.
    pub fn is_paused(&self) -> bool {
        self.shared.control.all_parked()
    }

    /// Stop the machine.
    pub fn quit(&self) {
        self.shared.control.resume();
        self.shared.request_stop(STOP_RESET);
    }
}

/// The virtio devices the configuration asks for, in window order: disks,
/// then network devices, then the entropy device.
fn create_virtio_devices(
    cfg: &MachineConfig,
    mem: &GuestMemoryMmap,
    lines: &dyn Fn(u32) -> Result<Arc<dyn InterruptLine>>,
    dma: &virtio::DmaObserver,
) -> Result<Vec<MmioTransport>> {
    let mut models: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in &cfg.disks {
        let backend = disk::open_with(
            &d.path,
            &disk::OpenOptions {
                read_only: d.read_only,
                format: d.format,
            },
            &disk::BackingRules {
                allow_absolute_backing: d.allow_absolute_backing,
            },
        )
        .map_err(|e| Error::Config(format!("disk {e}")))?;
        models.push(Box::new(Block::new(Arc::from(backend))));
    }
    for n in &cfg.nets {
        let tap = Tap::open(n.tap.as_deref()).map_err(|e| Error::Config(format!("--net: {e}")))?;
        tracing::info!("virtio-net on tap {}", tap.name());
        models.push(Box::new(Net::new(tap, n.mac.unwrap_or_else(random_mac))));
    }
    if cfg.rng {
        models.push(Box::new(Rng::default()));
    }
    if let Some(path) = &cfg.console_output {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Config(format!("--console-output {}: {e}", path.display())))?;
        models.push(Box::new(Console::with_limit(file, cfg.console_output_limit)));
    }
    if models.len() > virtio::MAX_DEVICES {
        return Err(Error::Config(format!(
            "at most {} virtio devices, not {}",
            virtio::MAX_DEVICES,
            models.len()
        )));
    }
    models
        .into_iter()
        .enumerate()
        .map(|(i, model)| {
            let line = lines(virtio::FIRST_IRQ + i as u32)?;
            MmioTransport::new(model, mem.clone(), Arc::new(Interrupt::new(line)), dma.clone())
                .map_err(|e| Error::Config(format!("virtio device: {e}")))
        })
        .collect()
}

/// Feeds the serial console from another thread.
#[derive(Clone)]
pub struct ConsoleInput {
    shared: Arc<Shared>,
}

impl ConsoleInput {
    pub fn send(&self, bytes: &[u8]) {
        let mut p = self.shared.platform();
        p.serial.input(bytes);
        self.shared.serial_irq(&mut p);
    }

    /// Stop the machine (the user quit).
    pub fn quit(&self) {
        self.shared.request_stop(STOP_RESET);
    }
}
