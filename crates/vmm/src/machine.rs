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
use crate::cpu_features::CpuFeatures;
use crate::devices::acpi_pm::{self, PowerAction};
use crate::devices::i8042::{self, KeyError, I8042};
use crate::devices::irq::{InterruptRouter, Interrupts};
use crate::devices::irq_line::InterruptLine;
use crate::devices::mptable;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{SerialPort, COM1_BASE, COM1_IRQ};
pub use crate::emu::format_regs;
use crate::engine::{Control, Engine, EngineKind, EngineSave};
use crate::memory;
use crate::migration::dirty::DirtyLog;
use crate::virtio::console::Console;
use crate::virtio::mmio::{MmioState, MmioTransport};
use crate::virtio::net::{random_mac, Net};
use crate::virtio::tap::Tap;
use crate::virtio::vsock::Vsock;
use crate::virtio::{self, blk::Block, rng::Rng, Interrupt, VirtioDevice};
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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// A virtio-vsock device (Firecracker's hybrid Unix-socket back end).
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// emu engine: run hot guest code through x86emu's JIT tier (host code
    /// for blocks that ran often) instead of only its interpreter. On
    /// unless turned off (also for states saved before the field existed).
    #[serde(default = "jit_default")]
    pub jit: bool,
}

impl MachineConfig {
    /// One vCPU, `mem_size` bytes of memory, `kernel` with no initrd or
    /// command line, and no devices: the start of a configuration that
    /// names only what it changes.
    pub fn new(kernel: PathBuf, mem_size: u64) -> MachineConfig {
        MachineConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            mem_size,
            cpus: 1,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            console_output: None,
            console_output_limit: crate::virtio::console::DEFAULT_OUTPUT_LIMIT,
            vsock: None,
            jit: JIT_DEFAULT,
        }
    }
}

/// Whether the emu engine uses its JIT tier when nobody says: the one
/// default that the CLI, the API and saved states all take.
pub const JIT_DEFAULT: bool = true;

fn jit_default() -> bool {
    JIT_DEFAULT
}

/// A virtio-vsock device: the guest's CID and the host socket that stands
/// for it (docs/VSOCK.md).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The API's `vsock_id`, if one was given.
    #[serde(default)]
    pub id: Option<String>,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
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

impl DiskConfig {
    /// Open the image as this configuration says (format, read-only,
    /// backing rules): at start-up, and when a disk is taken back after a
    /// migration or written at a failover takeover.
    pub fn open(&self) -> disk::Result<Box<dyn disk::BlockBackend>> {
        disk::open_with(
            &self.path,
            &disk::OpenOptions {
                read_only: self.read_only,
                format: self.format,
            },
            &disk::BackingRules {
                allow_absolute_backing: self.allow_absolute_backing,
            },
        )
    }
}

/// A virtio-net device on a TAP interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The interface's name in the API (`iface_id`), for snapshot
    /// network overrides.
    #[serde(default)]
    pub id: Option<String>,
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
    /// The i8042 keyboard's IRQ 1, likewise.
    kbd_line: Arc<dyn InterruptLine>,
    /// Kicking and pausing the vCPUs, whatever the engine.
    pub(crate) control: Control,
    pub(crate) start: Instant,
    /// The machine clock when `start` was taken: 0 at boot, the saved
    /// clock after a restore (guest time goes on from there).
    pub(crate) clock_base_ns: u64,
    /// What the machine was built from (snapshots record it).
    pub(crate) config: MachineConfig,
    pub(crate) engine_kind: EngineKind,
    /// The CPU features the guest is offered (snapshots record them).
    pub(crate) cpu_features: CpuFeatures,
    /// The engine's side of a snapshot, when the engine holds state of its
    /// own (kvm); under emu the machine's models are all there is.
    pub(crate) engine_save: Option<Arc<dyn EngineSave>>,
    pub(crate) stop: AtomicU8,
    /// Why the guest stopped (triple fault or engine fault): the registers.
    pub(crate) triple_fault: Mutex<Option<String>>,
    /// vCPUs halted with IF=0 (a guest that is off for good).
    pub(crate) dead: std::sync::atomic::AtomicU32,
    /// virtio-mmio devices, device i at `virtio::MMIO_BASE + i * MMIO_SIZE`.
    pub(crate) virtio: Vec<Mutex<MmioTransport>>,
    /// Held while pausing or resuming, so the two never interleave.
    pausing: Mutex<()>,
    /// Which virtio devices gave their host resource up for a migration
    /// hand-over ([`VmHandle::release_backends`]).
    released: Mutex<Vec<bool>>,
    /// Pages written since the last harvest, while live migration tracks them.
    pub(crate) dirty: Arc<DirtyLog>,
}

impl Shared {
    /// A machine's shared state with 32 MiB of memory, the given
    /// interrupt controllers and serial output, and no devices or vCPUs:
    /// for tests of the buses.
    #[cfg(test)]
    pub(crate) fn for_tests(irqs: Arc<Interrupts>, console: Box<dyn Write + Send>) -> Arc<Shared> {
        let cfg = MachineConfig::new(PathBuf::new(), 32 << 20);
        Arc::new(Shared {
            mem: memory::create(cfg.mem_size).expect("memory"),
            irqs: irqs.clone(),
            platform: Mutex::new(Platform {
                serial: SerialPort::new(console),
                i8042: I8042::default(),
                rtc: Rtc::new(0),
            }),
            serial_line: Arc::new(crate::devices::irq_line::EmuLine {
                irqs: irqs.clone(),
                pin: COM1_IRQ,
            }),
            kbd_line: Arc::new(crate::devices::irq_line::EmuLine {
                irqs,
                pin: i8042::KBD_IRQ,
            }),
            control: Control::default(),
            start: Instant::now(),
            clock_base_ns: 0,
            config: cfg,
            engine_kind: EngineKind::Emu,
            cpu_features: CpuFeatures::emu(1),
            engine_save: None,
            stop: AtomicU8::new(RUNNING),
            triple_fault: Mutex::new(None),
            dead: std::sync::atomic::AtomicU32::new(0),
            virtio: Vec::new(),
            pausing: Mutex::new(()),
            released: Mutex::new(Vec::new()),
            dirty: Arc::default(),
        })
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.clock_base_ns
            .saturating_add(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX))
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

    /// The i8042 raised its interrupt: an edge on IRQ 1. Called with the
    /// platform lock held (lock order: platform, then interrupts).
    fn kbd_irq(&self, p: &mut Platform) {
        if p.i8042.take_irq() {
            self.kbd_line.trigger();
        }
    }

    /// The virtio-mmio device whose window holds `gpa`, and the offset.
    fn virtio_at(&self, gpa: u64) -> Option<(MutexGuard<'_, MmioTransport>, u64)> {
        let rel = gpa.checked_sub(virtio::MMIO_BASE)?;
        let dev = self.virtio.get((rel / virtio::MMIO_SIZE) as usize)?;
        Some((dev.lock().unwrap_or_else(|e| e.into_inner()), rel % virtio::MMIO_SIZE))
    }

    /// The machine stopped: end every device worker and flush the disks.
    fn stop_devices(&self) {
        for (i, dev) in self.virtio.iter().enumerate() {
            let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = dev.shutdown() {
                tracing::warn!("virtio device {i} (type {}): flushing on stop: {e}", dev.device_type());
            }
        }
    }

    fn virtio_devices(&self) -> impl Iterator<Item = MutexGuard<'_, MmioTransport>> {
        self.virtio.iter().map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
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

    fn note_write_mapping(&mut self, gpa: u64) {
        self.shared.dirty.mark(gpa);
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
            dev.write(offset, data);
            // A reset's worker finishes its request in flight: wait for it
            // without the device's lock, so other vCPUs are not held up.
            let retiring = dev.take_retiring();
            drop(dev);
            if let Some(r) = retiring {
                r.wait();
            }
            return;
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
            || self.shared.dirty.flush_wanted()
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
            i8042::DATA_PORT | i8042::STATUS_PORT => {
                let mut p = self.shared.platform();
                let v = p.i8042.read(port);
                self.shared.kbd_irq(&mut p);
                v
            }
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
                self.shared.kbd_irq(&mut p);
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
        // The engine's interrupt controller takes the device lines. Device
        // writes to guest memory go to the engine (x86emu drops decoded code
        // there) and to the dirty log a live migration reads.
        let setup = crate::engine::prepare(engine, &mem, cfg.cpus, &irqs, &code_map, None, cfg.jit)?;
        let lines = |pin: u32| setup.irq_line(pin);
        let dirty = Arc::new(DirtyLog::default());
        let dma = with_dirty_log(setup.dma_observer(), &dirty);
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
        let kbd_line = lines(i8042::KBD_IRQ)?;
        let ready = setup.boot(&boot_state, &devices)?;
        if let Some(log) = ready.dirty_log {
            dirty.set_engine(log);
        }
        let engine = ready.engine;
        let shared = Arc::new(Shared {
            mem,
            irqs,
            platform: Mutex::new(Platform {
                serial: SerialPort::new(console),
                i8042: I8042::default(),
                rtc: Rtc::new(0),
            }),
            serial_line,
            kbd_line,
            control: Control::default(),
            start: Instant::now(),
            clock_base_ns: 0,
            config: cfg.clone(),
            engine_kind: engine.kind(),
            cpu_features: ready.cpu_features,
            engine_save: ready.save,
            stop: AtomicU8::new(RUNNING),
            triple_fault: Mutex::new(None),
            dead: std::sync::atomic::AtomicU32::new(0),
            virtio: devices.into_iter().map(Mutex::new).collect(),
            pausing: Mutex::new(()),
            released: Mutex::new(Vec::new()),
            dirty,
        });
        Ok(Machine { shared, engine })
    }

    /// A machine in the state a snapshot saved, with its memory mapped
    /// copy-on-write from `mem_file` and its devices opened from
    /// `state.config` (the caller may change the config first, say a
    /// network override). It starts paused: [`VmHandle::resume`] runs it.
    /// A snapshot of either engine restores under either, when `engine`
    /// offers every CPU feature the guest saw (refused, naming them,
    /// otherwise).
    pub fn restore(
        state: &crate::persist::MachineState,
        mem_file: &std::path::Path,
        console: Box<dyn Write + Send>,
        engine: EngineKind,
    ) -> Result<Self> {
        let mem = memory::map_private(mem_file, state.config.mem_size)?;
        // A restore from a snapshot is a new generation of the VM (it may be
        // one of many clones).
        Self::restored(state, mem, console, engine, true)
    }

    /// [`Machine::restore`] with guest memory already filled (a migration
    /// destination: anonymous memory written from the stream's pages). It
    /// must have the layout `memory::ram_ranges` gives for the state's
    /// memory size. The VM moved rather than forked, so its generation ID
    /// stays (as under Hyper-V and QEMU live migration).
    pub fn restore_with_memory(
        state: &crate::persist::MachineState,
        mem: GuestMemoryMmap,
        console: Box<dyn Write + Send>,
        engine: EngineKind,
    ) -> Result<Self> {
        Self::restored(state, mem, console, engine, false)
    }

    /// The machine `state` describes over `mem`, paused; with
    /// `new_generation`, under a new VM generation ID.
    fn restored(
        state: &crate::persist::MachineState,
        mem: GuestMemoryMmap,
        console: Box<dyn Write + Send>,
        engine: EngineKind,
        new_generation: bool,
    ) -> Result<Self> {
        state.validate().map_err(|e| Error::Config(e.to_string()))?;
        let expected = memory::ram_ranges(state.config.mem_size);
        let layout: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        if layout != expected {
            return Err(Error::Memory(format!(
                "guest memory is laid out as {layout:x?}, the state's machine as {expected:x?}"
            )));
        }
        let cfg = &state.config;
        let irqs = Arc::new(Interrupts::new(InterruptRouter::from_state(state.interrupts.clone())));
        let code_map = Arc::new(CodeMap::new(mem.last_addr().0 + 1));
        let setup = crate::engine::prepare(
            engine,
            &mem,
            cfg.cpus,
            &irqs,
            &code_map,
            Some(&state.cpu_features),
            cfg.jit,
        )?;
        let lines = |pin: u32| setup.irq_line(pin);
        let dirty = Arc::new(DirtyLog::default());
        let dma = with_dirty_log(setup.dma_observer(), &dirty);
        let mut devices = create_virtio_devices(cfg, &mem, &lines, &dma)?;
        for (i, (dev, saved)) in devices.iter_mut().zip(&state.devices).enumerate() {
            dev.restore_state(saved)
                .map_err(|e| Error::Config(format!("snapshot: virtio device {i}: {e}")))?;
        }
        let serial = SerialPort::restore(&state.platform.serial, console)
            .map_err(|e| Error::Config(format!("snapshot: {e}")))?;
        let serial_line = lines(COM1_IRQ)?;
        let kbd_line = lines(i8042::KBD_IRQ)?;
        let vmgenid_line = lines(acpi::VMGENID_GSI)?;
        let ready = setup.restore(state, &devices)?;
        if let Some(log) = ready.dirty_log {
            dirty.set_engine(log);
        }
        let engine = ready.engine;
        let shared = Arc::new(Shared {
            mem,
            irqs,
            platform: Mutex::new(Platform {
                serial,
                i8042: state.platform.i8042.clone(),
                rtc: Rtc::from_state(state.platform.rtc.clone()),
            }),
            serial_line,
            kbd_line,
            control: Control::default(),
            start: Instant::now(),
            clock_base_ns: state.clock_ns,
            config: cfg.clone(),
            engine_kind: engine.kind(),
            cpu_features: ready.cpu_features,
            engine_save: ready.save,
            stop: AtomicU8::new(RUNNING),
            triple_fault: Mutex::new(None),
            dead: std::sync::atomic::AtomicU32::new(0),
            virtio: devices.into_iter().map(Mutex::new).collect(),
            pausing: Mutex::new(()),
            released: Mutex::new(Vec::new()),
            dirty,
        });
        // Held until resume: the vCPUs park before running any guest code.
        shared.control.pause(Duration::ZERO);
        // A new generation of the VM (VMGenID): a guest that supports it
        // reads the new ID when the interrupt reaches it and reseeds its
        // random generator, so clones do not share one.
        if new_generation {
            acpi::new_generation_id(&shared.mem)?;
            vmgenid_line.trigger();
        }
        {
            let mut p = shared.platform();
            shared.serial_irq(&mut p);
        }
        Ok(Machine { shared, engine })
    }

    /// The engine that runs the vCPUs.
    pub fn engine(&self) -> EngineKind {
        self.engine.kind()
    }

    /// Give up a machine that never ran (a migration that did not
    /// commit): its device workers end and its disks are flushed.
    pub fn discard(self) {
        self.shared.stop_devices();
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

    /// Run all vCPUs until the guest ends (or [`VmHandle::quit`]).
    ///
    /// When it returns, every vCPU thread and every device worker has
    /// ended (each after finishing its request in flight), and every
    /// writable disk has been flushed to stable storage (fdatasync), so the
    /// process may exit at once.
    pub fn run(self) -> RunOutcome {
        let outcome = self.engine.run(self.shared.clone());
        self.shared.stop_devices();
        outcome
    }
}

/// What a snapshot wrote.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotInfo {
    /// The state file's size.
    pub state_bytes: u64,
    /// Bytes of memory written (pages of zeroes are holes).
    pub mem_bytes: u64,
    /// The memory file's size (the guest's memory).
    pub mem_size: u64,
}

/// Pauses and resumes a running VM.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<Shared>,
}

impl VmHandle {
    /// Pause the VM and make it quiescent: take every vCPU out of guest
    /// code and hold it, then stop every virtio device's worker once its
    /// request in flight is done, keeping the queues where they stand.
    /// While paused, neither guest memory nor device state changes (input
    /// waiting on the host side, such as frames on a TAP or console
    /// bytes, waits there), so the VM can be saved. `false` when not every
    /// vCPU stopped within `timeout`: the devices then keep running and
    /// the vCPUs still stop later; call `pause` again to finish or
    /// `resume` to give up.
    pub fn pause(&self, timeout: Duration) -> bool {
        let _serial = self.shared.pausing.lock().unwrap_or_else(|e| e.into_inner());
        if !self.shared.control.pause(timeout) {
            return false;
        }
        for mut dev in self.shared.virtio_devices() {
            dev.pause();
        }
        true
    }

    /// Undo [`VmHandle::pause`]: the device workers start again where
    /// their queues stopped, then the vCPUs continue.
    pub fn resume(&self) {
        // A migration handed the disks or TAPs over: running without them
        // would fail the guest's I/O (or run it twice).
        if self.backends_released() {
            tracing::error!("not resuming: the VM's disks or TAPs are handed over to a migration's destination");
            return;
        }
        let _serial = self.shared.pausing.lock().unwrap_or_else(|e| e.into_inner());
        for mut dev in self.shared.virtio_devices() {
            dev.resume();
        }
        self.shared.control.resume();
        // Console input that arrived while paused.
        let mut p = self.shared.platform();
        p.serial.refill();
        self.shared.serial_irq(&mut p);
    }

    /// While paused: the machine's whole state but its memory.
    pub fn save_state(&self) -> std::result::Result<crate::persist::MachineState, crate::persist::PersistError> {
        use crate::persist::{DiskRef, MachineState, PersistError, PlatformState};
        if !self.is_paused() {
            return Err(PersistError::Save("the VM is not paused".into()));
        }
        let mut cpus = self
            .vcpu_states()
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| PersistError::Save(format!("vcpu{i}'s state is unreadable"))))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if cpus.len() != self.shared.config.cpus as usize {
            return Err(PersistError::Save(format!(
                "{} of {} vCPUs parked",
                cpus.len(),
                self.shared.config.cpus
            )));
        }
        let platform = {
            let p = self.shared.platform();
            PlatformState {
                serial: p.serial.save(),
                i8042: p.i8042.clone(),
                rtc: p.rtc.state(),
            }
        };
        let cfg = &self.shared.config;
        let clock_ns = self.shared.now_ns();
        let (interrupts, kvm) = match &self.shared.engine_save {
            Some(engine) => engine.save(&mut cpus, clock_ns)?,
            None => (self.shared.irqs.state(), None),
        };
        let state = MachineState {
            vessel_version: env!("CARGO_PKG_VERSION").into(),
            config: cfg.clone(),
            engine: self.shared.engine_kind,
            clock_ns,
            cpus,
            cpu_features: self.shared.cpu_features,
            platform,
            interrupts,
            devices: self.shared.virtio_devices().map(|d| d.state()).collect(),
            disks: cfg
                .disks
                .iter()
                .map(|d| DiskRef {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    frozen: false,
                })
                .collect(),
            kvm,
        };
        state.validate()?;
        Ok(state)
    }

    /// While paused: write the state to `state_file` and guest memory to
    /// `mem_file`. Writable disks are flushed first.
    pub fn snapshot(
        &self,
        state_file: &std::path::Path,
        mem_file: &std::path::Path,
    ) -> std::result::Result<SnapshotInfo, crate::persist::PersistError> {
        use crate::persist::PersistError;
        let mut state = self.save_state()?;
        for (i, mut dev) in self.shared.virtio_devices().enumerate() {
            dev.flush()
                .map_err(|e| PersistError::Save(format!("flushing virtio device {i}: {e}")))?;
        }
        // Each writable qcow2 disk's top becomes a layer of the snapshot,
        // and the VM goes on in a new overlay (docs/SNAPSHOTS.md, "Disks").
        // The disks are the first devices, in configuration order.
        let layer = format!("vmsnap-{}", unix_millis());
        for (d, dev) in state.disks.iter_mut().zip(self.shared.virtio_devices()) {
            if let Some(frozen) = dev
                .freeze_disk(&layer)
                .map_err(|e| PersistError::Save(format!("freezing disk {}: {e}", d.path.display())))?
            {
                d.path = frozen;
                d.frozen = true;
            }
        }
        let mem_bytes =
            memory::save_to_file(&self.shared.mem, mem_file).map_err(|e| PersistError::Save(e.to_string()))?;
        let state_bytes = state.write_file(state_file)?;
        Ok(SnapshotInfo {
            state_bytes,
            mem_bytes,
            mem_size: self.shared.config.mem_size,
        })
    }

    /// While paused: each vCPU's state, as x86emu's `CpuState` under both
    /// engines (`None` for a vCPU whose state could not be read).
    pub fn vcpu_states(&self) -> Vec<Option<x86emu::CpuState>> {
        self.shared.control.vcpu_states()
    }

    /// Whether the VM is paused: every vCPU out of guest code and every
    /// device stopped.
    pub fn is_paused(&self) -> bool {
        self.shared.control.all_parked() && self.shared.virtio_devices().all(|d| d.is_paused())
    }

    /// Stop the machine: [`Machine::run`] returns soon after, once the
    /// vCPUs have left guest code, the device workers have finished their
    /// requests in flight and the disks are flushed. Works while paused
    /// too (the devices are not started again).
    pub fn quit(&self) {
        self.shared.request_stop(STOP_RESET);
        self.shared.control.resume();
    }

    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard (Firecracker's
    /// `SendCtrlAltDel`): the scan codes go out with IRQ 1. A Linux guest
    /// restarts, which with `reboot=k` ends the run with
    /// [`RunOutcome::Reset`]. Fails when the guest does not read its
    /// keyboard (no i8042 driver: the buffer fills) or disabled it, and
    /// while the VM is paused (its devices must not change then).
    pub fn send_ctrl_alt_del(&self) -> std::result::Result<(), KeyError> {
        let _serial = self.shared.pausing.lock().unwrap_or_else(|e| e.into_inner());
        if self.shared.control.pause_requested() {
            return Err(KeyError::Paused);
        }
        let mut p = self.shared.platform();
        p.i8042.trigger_ctrl_alt_del()?;
        self.shared.kbd_irq(&mut p);
        Ok(())
    }

    /// Each virtio device's transport state (registers, queue positions),
    /// in window order. For tests and snapshots: the positions are current
    /// only while the VM is paused.
    pub fn device_states(&self) -> Vec<MmioState> {
        self.shared.virtio_devices().map(|d| d.state()).collect()
    }

    /// While paused, for a migration hand-over: make the writable disks
    /// durable (fdatasync) and let go of every host resource (disk images
    /// with their locks, TAPs), so that the destination can open them. The
    /// VM must not resume before [`VmHandle::reattach_backends`]. On
    /// failure, what was released is taken back.
    pub fn release_backends(&self) -> std::result::Result<(), String> {
        let failed = {
            let mut released = self.shared.released.lock().unwrap_or_else(|e| e.into_inner());
            released.resize(self.shared.virtio.len(), false);
            let mut failed = None;
            for (i, mut dev) in self.shared.virtio_devices().enumerate() {
                if released[i] {
                    continue;
                }
                if !dev.is_paused() {
                    failed = Some("the VM is not paused".to_string());
                    break;
                }
                if let Err(e) = dev.release_backend() {
                    failed = Some(format!("virtio device {i}: {e}"));
                    break;
                }
                released[i] = true;
            }
            failed
        };
        match failed {
            None => Ok(()),
            Some(why) => Err(match self.reattach_backends(Duration::from_secs(10)) {
                Ok(()) => why,
                Err(e) => format!("{why}; and then {e}"),
            }),
        }
    }

    /// Reopen what [`VmHandle::release_backends`] let go, as the machine's
    /// configuration names it (a TAP by its name), trying until `timeout`:
    /// the other side may hold a disk's lock or the TAP a moment longer.
    pub fn reattach_backends(&self, timeout: Duration) -> std::result::Result<(), String> {
        let start = Instant::now();
        let cfg = &self.shared.config;
        let mut released = self.shared.released.lock().unwrap_or_else(|e| e.into_inner());
        for (i, mut dev) in self.shared.virtio_devices().enumerate() {
            if !released.get(i).copied().unwrap_or(false) {
                continue;
            }
            let open = |dev: &MmioTransport| -> std::result::Result<Option<virtio::HostBackend>, String> {
                if let Some(d) = cfg.disks.get(i) {
                    let b = d.open().map_err(|e| format!("disk {e}"))?;
                    return Ok(Some(virtio::HostBackend::Disk(Arc::from(b))));
                }
                if let Some(net) = dev.net_identity() {
                    let tap = Tap::open(Some(&net.tap)).map_err(|e| e.to_string())?;
                    return Ok(Some(virtio::HostBackend::Tap(tap)));
                }
                Ok(None)
            };
            loop {
                let r = open(&dev).and_then(|b| match b {
                    Some(b) => dev.attach_backend(b).map_err(|e| e.to_string()),
                    None => dev.reopen_backend().map_err(|e| e.to_string()),
                });
                match r {
                    Ok(()) => break,
                    Err(e) if start.elapsed() >= timeout => {
                        return Err(format!("cannot take virtio device {i}'s host resource back: {e}"))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            released[i] = false;
        }
        Ok(())
    }

    /// Whether some device's host resource is handed over (the VM must
    /// not run).
    pub fn backends_released(&self) -> bool {
        self.shared
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|&r| r)
    }

    /// While paused: mark every ready queue's used ring in the dirty log.
    /// Devices write their used rings through the queue code, not through
    /// the DMA observer the dirty log hears, so a migration's switch and
    /// every failover epoch send these pages once more (only ranges inside
    /// guest RAM: a driver may place a ring anywhere).
    pub fn mark_used_rings_dirty(&self) {
        let rings = self
            .device_states()
            .into_iter()
            .flat_map(|d| d.queues.into_iter())
            .filter(|q| q.ready)
            // flags, idx, the ring of 8-byte entries, avail_event
            .map(|q| (q.used_ring, 6 + 8 * u64::from(q.size)))
            .filter(|&(gpa, len)| {
                vm_memory::GuestMemoryBackend::check_range(&self.shared.mem, vm_memory::GuestAddress(gpa), len as usize)
            });
        for (gpa, len) in rings {
            self.shared.dirty.mark_range(gpa, len);
        }
    }

    /// Each virtio-net device's TAP and the MAC the guest uses, in order.
    pub fn net_identities(&self) -> Vec<virtio::net::NetState> {
        self.shared.virtio_devices().filter_map(|d| d.net_identity()).collect()
    }

    /// Failover: the devices that talk to the outside world (virtio-net)
    /// send through `gate` from now on.
    pub fn set_output_gate(&self, gate: &Arc<crate::migration::failover::OutputGate>) {
        for mut d in self.shared.virtio_devices() {
            d.set_output_gate(gate.clone());
        }
    }

    /// Failover: each writable disk's overlay of held writes, with the
    /// disk's index in the configuration (disks come first in window
    /// order).
    pub fn disk_overlays(&self) -> Vec<(u32, Arc<virtio::epoch_overlay::EpochOverlay>)> {
        self.shared
            .virtio_devices()
            .enumerate()
            .take(self.shared.config.disks.len())
            .filter_map(|(i, d)| d.epoch_overlay().map(|o| (i as u32, o)))
            .collect()
    }

    /// Announce the guest's MAC addresses on their TAPs (one RARP frame
    /// each); how many went out.
    pub fn announce_network(&self) -> usize {
        let mut sent = 0;
        for (i, d) in self.shared.virtio_devices().enumerate() {
            if d.net_identity().is_some() {
                match d.announce() {
                    Ok(()) => sent += 1,
                    Err(e) => tracing::warn!("virtio device {i}: announce: {e}"),
                }
            }
        }
        sent
    }

    /// Guest memory (shared with the running machine), for migration.
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        self.shared.mem.clone()
    }

    /// The dirty-page log live migration uses.
    pub fn dirty_log(&self) -> &DirtyLog {
        &self.shared.dirty
    }

    /// The engine running the vCPUs.
    pub fn engine_kind(&self) -> EngineKind {
        self.shared.engine_kind
    }

    /// What the machine was built from.
    pub fn config(&self) -> &MachineConfig {
        &self.shared.config
    }

    /// Take every vCPU out of guest code once (they go on at once).
    pub fn kick_vcpus(&self) {
        self.shared.control.kick();
    }

    /// Whether the machine stopped (or is stopping) for good.
    pub fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire) != RUNNING
    }

    /// A 64-bit digest of all guest memory, for tests and snapshots to
    /// tell whether memory changed (say, while paused). Not cryptographic;
    /// stable across runs and builds.
    pub fn guest_memory_digest(&self) -> u64 {
        memory::digest(&self.shared.mem)
    }
}

/// `engine`'s observer of device writes to guest memory, which also marks
/// the pages in `dirty` (for live migration).
fn with_dirty_log(engine: virtio::DmaObserver, dirty: &Arc<DirtyLog>) -> virtio::DmaObserver {
    let dirty = dirty.clone();
    Arc::new(move |gpa, len| {
        engine(gpa, len);
        dirty.mark_range(gpa, len);
    })
}

/// Milliseconds since the Unix epoch, to name things uniquely.
pub fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// The virtio devices the configuration asks for, in window order: disks,
/// network devices, the entropy device, the console, the socket device.
fn create_virtio_devices(
    cfg: &MachineConfig,
    mem: &GuestMemoryMmap,
    lines: &dyn Fn(u32) -> Result<Arc<dyn InterruptLine>>,
    dma: &virtio::DmaObserver,
) -> Result<Vec<MmioTransport>> {
    let mut models: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in &cfg.disks {
        let backend = d.open().map_err(|e| Error::Config(format!("disk {e}")))?;
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
    if let Some(v) = &cfg.vsock {
        let dev = Vsock::new(v.guest_cid, &v.uds_path).map_err(|e| Error::Config(e.to_string()))?;
        models.push(Box::new(dev));
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
    /// Type `bytes` on the guest's serial console, in order, none lost.
    /// They wait in a host-side buffer (at most
    /// [`crate::devices::serial::INPUT_BUFFER`], 1 MiB) and move into the
    /// UART's 64-byte FIFO as the guest reads it. When the buffer is full,
    /// `send` blocks until the guest has read enough, or the machine stops;
    /// it returns how many bytes it took: all of them, unless the machine
    /// stopped first. While the VM is paused, input only waits in the
    /// buffer (and a full buffer blocks `send` until the VM resumes).
    pub fn send(&self, bytes: &[u8]) -> usize {
        let mut done = 0;
        loop {
            done += self.try_send(&bytes[done..]);
            if done == bytes.len() || self.shared.stop.load(Ordering::Acquire) != RUNNING {
                return done;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// [`ConsoleInput::send`] without blocking: takes what fits in the host
    /// buffer now and returns how many bytes that was.
    pub fn try_send(&self, bytes: &[u8]) -> usize {
        let mut p = self.shared.platform();
        let n = p.serial.queue_input(bytes);
        if !self.shared.control.pause_requested() {
            p.serial.refill();
            self.shared.serial_irq(&mut p);
        }
        n
    }

    /// Stop the machine (the user quit).
    pub fn quit(&self) {
        self.shared.request_stop(STOP_RESET);
    }
}
