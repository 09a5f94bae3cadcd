//! The machine: guest memory, the devices on the port and MMIO buses, the
//! interrupt router, and one thread per vCPU running the `emu` engine.

use std::io::Write;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use x86emu::state::{flags, CpuState, Segment};
use x86emu::{Bus, CodeMap, Cpu, CpuConfig, Exit};

use crate::acpi::{self, VirtioSlot};
use crate::boot::{self, BootSpec};
use crate::devices::acpi_pm::{self, PowerAction};
use crate::devices::i8042::{self, I8042};
use crate::devices::irq::{InterruptRouter, Interrupts};
use crate::devices::irq_line::EmuLine;
use crate::devices::mptable;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{SerialPort, COM1_BASE, COM1_IRQ};
use crate::memory;
use crate::virtio::console::Console;
use crate::virtio::net::{random_mac, Net};
use crate::virtio::tap::Tap;
use crate::virtio::{self, blk::Block, mmio::MmioTransport, rng::Rng, Interrupt, VirtioDevice};
use crate::{Error, Result};

/// Guest TSC rate, advertised through CPUID.
pub const TSC_KHZ: u32 = 2_000_000;
/// Most vCPUs a machine may have.
pub const MAX_CPUS: u32 = 64;
/// Instructions a vCPU runs between checks of machine-wide state.
const SLICE: u64 = 200_000;

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
}

/// A virtio-blk disk.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Follow qcow2 backing-file names that are absolute or contain `..`
    /// (by default only names relative to the image, inside its folder).
    pub allow_absolute_backing: bool,
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
}

const RUNNING: u8 = 0;
const STOP_RESET: u8 = 1;
const STOP_TRIPLE: u8 = 2;
const STOP_HALTED: u8 = 3;

/// Devices behind one lock: the serial port, the i8042 and the RTC.
pub struct Platform {
    pub serial: SerialPort<Box<dyn Write + Send>>,
    pub i8042: I8042,
    pub rtc: Rtc,
}

/// State shared by the vCPU threads.
struct Shared {
    mem: GuestMemoryMmap,
    irqs: Arc<Interrupts>,
    platform: Mutex<Platform>,
    start: Instant,
    stop: AtomicU8,
    triple_fault: Mutex<Option<String>>,
    /// vCPUs halted with IF=0 (a guest that is off for good).
    dead: std::sync::atomic::AtomicU32,
    /// virtio-mmio devices, device i at `virtio::MMIO_BASE + i * MMIO_SIZE`.
    virtio: Vec<Mutex<MmioTransport>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn platform(&self) -> MutexGuard<'_, Platform> {
        self.platform.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The UART raised its interrupt: an edge on IRQ 4. Called with the
    /// platform lock held (lock order: platform, then interrupts).
    fn serial_irq(&self, p: &mut Platform) {
        if p.serial.irq.0.swap(false, Ordering::AcqRel) {
            self.irqs.pulse_irq(COM1_IRQ);
        }
    }

    /// The virtio-mmio device whose window holds `gpa`, and the offset.
    fn virtio_at(&self, gpa: u64) -> Option<(MutexGuard<'_, MmioTransport>, u64)> {
        let rel = gpa.checked_sub(virtio::MMIO_BASE)?;
        let dev = self.virtio.get((rel / virtio::MMIO_SIZE) as usize)?;
        Some((dev.lock().unwrap_or_else(|e| e.into_inner()), rel % virtio::MMIO_SIZE))
    }

    fn request_stop(&self, why: u8) {
        let _ = self
            .stop
            .compare_exchange(RUNNING, why, Ordering::AcqRel, Ordering::Acquire);
        for cpu in 0..self.irqs.num_cpus() {
            self.irqs.kick(cpu);
        }
    }
}

/// One vCPU's view of the machine.
struct VcpuBus {
    id: usize,
    shared: Arc<Shared>,
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

    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        let mask = if size >= 4 { u32::MAX } else { (1u32 << (size * 8)) - 1 };
        let now = self.shared.now_ns();
        let v = match port {
            COM1_BASE..=0x3ff => {
                let mut p = self.shared.platform();
                let v = p.serial.read(port);
                self.shared.serial_irq(&mut p);
                v as u32
            }
            i8042::DATA_PORT | i8042::STATUS_PORT => self.shared.platform().i8042.read(port) as u32,
            0x70 | 0x71 => self.shared.platform().rtc.read(port, now) as u32,
            p if acpi_pm::handles(p) => acpi_pm::read(p) as u32,
            _ => match self.shared.irqs.with(|r| r.io_read(port, now)) {
                Some(v) => v as u32,
                None => u32::MAX,
            },
        };
        v & mask
    }

    fn io_out(&mut self, port: u16, _size: u8, value: u32) {
        let now = self.shared.now_ns();
        match port {
            COM1_BASE..=0x3ff => {
                let mut p = self.shared.platform();
                p.serial.write(port, value as u8);
                self.shared.serial_irq(&mut p);
            }
            i8042::DATA_PORT | i8042::STATUS_PORT => {
                let mut p = self.shared.platform();
                p.i8042.write(port, value as u8);
                if p.i8042.reset_requested {
                    drop(p);
                    self.shared.request_stop(STOP_RESET);
                }
            }
            0x70 | 0x71 => self.shared.platform().rtc.write(port, value as u8, now),
            p if acpi_pm::handles(p) => match acpi_pm::action(p, value as u8) {
                PowerAction::PowerOff => self.shared.request_stop(STOP_HALTED),
                PowerAction::Reset => self.shared.request_stop(STOP_RESET),
                PowerAction::None => {}
            },
            _ => {
                self.shared.irqs.with(|r| r.io_write(port, value as u8, now));
            }
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
        self.shared.now_ns().saturating_mul(TSC_KHZ as u64) / 1_000_000
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
        self.shared.stop.load(Ordering::Acquire) != RUNNING || self.shared.irqs.events_pending(self.id)
    }
}

pub struct Machine {
    shared: Arc<Shared>,
    cpus: Vec<Cpu>,
}

impl Machine {
    /// Build the machine and load the guest. Errors are the user's to fix
    /// (bad kernel, memory size, CPU count).
    pub fn new(cfg: &MachineConfig, console: Box<dyn Write + Send>) -> Result<Self> {
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
        let devices = create_virtio_devices(cfg, &mem, &irqs, &code_map)?;
        let mut cmdline = cfg.cmdline.clone();
        for i in 0..devices.len() {
            // For kernels built with VIRTIO_MMIO_CMDLINE_DEVICES; ACPI
            // describes the same devices to the others.
            cmdline.push_str(&format!(
                " virtio_mmio.device=4K@{:#x}:{}",
                virtio::MMIO_BASE + i as u64 * virtio::MMIO_SIZE,
                virtio::FIRST_IRQ + i as u32
            ));
        }
        // ACPI for kernels that have it (the same virtio devices, as
        // LNRO0005 nodes); the MP table for those that do not.
        let slots: Vec<VirtioSlot> = (0..devices.len())
            .map(|i| VirtioSlot {
                base: virtio::MMIO_BASE + i as u64 * virtio::MMIO_SIZE,
                size: virtio::MMIO_SIZE,
                gsi: virtio::FIRST_IRQ + i as u32,
            })
            .collect();
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
        let start = Instant::now();
        let shared = Arc::new(Shared {
            mem,
            irqs,
            platform: Mutex::new(Platform {
                serial: SerialPort::new(console),
                i8042: I8042::default(),
                rtc: Rtc::new(0),
            }),
            start,
            stop: AtomicU8::new(RUNNING),
            triple_fault: Mutex::new(None),
            dead: std::sync::atomic::AtomicU32::new(0),
            virtio: devices.into_iter().map(Mutex::new).collect(),
        });
        let cpus = (0..cfg.cpus)
            .map(|i| {
                let config = CpuConfig {
                    apic_id: i,
                    cpu_count: cfg.cpus,
                    tsc_khz: TSC_KHZ,
                    ..CpuConfig::default()
                };
                let mut cpu = Cpu::new(config, code_map.clone());
                if i == 0 {
                    cpu.set_state(boot_state.clone());
                    cpu.state.apic_base = 0xfee0_0000 | (1 << 11) | (1 << 8);
                } else {
                    // Application processors wait for INIT/SIPI.
                    cpu.state.events.wait_for_sipi = true;
                }
                cpu
            })
            .collect();
        Ok(Machine { shared, cpus })
    }

    /// A handle that can feed console input while `run` blocks.
    pub fn input_handle(&self) -> ConsoleInput {
        ConsoleInput {
            shared: self.shared.clone(),
        }
    }

    /// Run all vCPUs until the guest ends.
    pub fn run(self) -> RunOutcome {
        let n = self.cpus.len();
        let handles: Vec<_> = self
            .cpus
            .into_iter()
            .enumerate()
            .map(|(id, cpu)| {
                let shared = self.shared.clone();
                std::thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn(move || vcpu_thread(id, cpu, shared, n))
                    .expect("spawning a vCPU thread")
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        match self.shared.stop.load(Ordering::Acquire) {
            STOP_TRIPLE => RunOutcome::TripleFault(
                self.shared
                    .triple_fault
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_default(),
            ),
            STOP_HALTED => RunOutcome::PowerOff,
            _ => RunOutcome::Reset,
        }
    }
}

/// The virtio devices the configuration asks for, in window order: disks,
/// then network devices, then the entropy device.
fn create_virtio_devices(
    cfg: &MachineConfig,
    mem: &GuestMemoryMmap,
    irqs: &Arc<Interrupts>,
    code_map: &Arc<CodeMap>,
) -> Result<Vec<MmioTransport>> {
    // Device writes to guest memory drop x86emu's cached decoded code there.
    let code_map = code_map.clone();
    let dma: virtio::DmaObserver = Arc::new(move |gpa, len| code_map.invalidate_range(gpa, len));
    let mut models: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in &cfg.disks {
        let backend = disk::open_with(
            &d.path,
            &disk::OpenOptions { read_only: d.read_only },
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
        models.push(Box::new(Console::new(file)));
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
            let line = Arc::new(EmuLine {
                irqs: irqs.clone(),
                pin: virtio::FIRST_IRQ + i as u32,
            });
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

fn vcpu_thread(id: usize, mut cpu: Cpu, shared: Arc<Shared>, ncpus: usize) {
    let mut bus = VcpuBus {
        id,
        shared: shared.clone(),
    };
    let now = || shared.now_ns();
    let mut counted_dead = false;
    while shared.stop.load(Ordering::Acquire) == RUNNING {
        if shared.irqs.events_pending(id) {
            let ev = shared.irqs.take_events(id);
            if ev.init && id != 0 {
                let apic_base = cpu.state.apic_base;
                cpu.set_state(CpuState::reset());
                cpu.state.apic_base = apic_base;
                cpu.state.events.wait_for_sipi = true;
            }
            if let Some(vector) = ev.sipi {
                if cpu.state.events.wait_for_sipi {
                    start_at_sipi(&mut cpu, vector);
                }
            }
            if ev.nmi {
                cpu.inject_nmi();
            }
        }
        match cpu.run(&mut bus, SLICE) {
            Exit::Budget | Exit::ExitRequested | Exit::Shutdown => {}
            Exit::Halted => {
                let if_set = cpu.state.rflags & flags::IF != 0;
                if !if_set && !counted_dead {
                    counted_dead = true;
                    // All vCPUs halted with interrupts off: the guest is done
                    // (for example `reboot: System halted`).
                    if shared.dead.fetch_add(1, Ordering::AcqRel) + 1 == ncpus as u32 {
                        shared.request_stop(STOP_HALTED);
                    }
                }
                shared.irqs.halt(id, &now, Duration::from_millis(100), if_set);
            }
            Exit::WaitForSipi => shared.irqs.halt(id, &now, Duration::from_millis(100), false),
            Exit::TripleFault => {
                *shared.triple_fault.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("vcpu{id}: {}", format_regs(&cpu)));
                shared.request_stop(STOP_TRIPLE);
            }
        }
        if counted_dead && !cpu.state.events.halted {
            counted_dead = false;
            shared.dead.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let st = &cpu.stats;
    tracing::info!(
        "vcpu{id}: {} instructions, {} blocks decoded, {} exceptions, {} interrupts; unimplemented (raised #UD): {:?}",
        st.instructions,
        st.blocks_decoded,
        st.exceptions,
        st.interrupts,
        st.unimplemented
    );
}

/// Start an application processor in real mode at `vector << 12`.
fn start_at_sipi(cpu: &mut Cpu, vector: u8) {
    let mut s = cpu.state.clone();
    s.segs[1] = Segment::real_mode((vector as u16) << 8, true);
    s.rip = 0;
    s.events.wait_for_sipi = false;
    s.events.halted = false;
    cpu.set_state(s);
}

/// The vCPU's registers, for error reports.
pub fn format_regs(cpu: &Cpu) -> String {
    let s = &cpu.state;
    let names = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    ];
    let mut out = format!(
        "rip={:#018x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        s.rip, s.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
    );
    for (n, v) in names.iter().zip(s.gpr.iter()) {
        out.push_str(&format!(" {n}={v:#x}"));
    }
    out.push_str(&format!(
        " cs={:#x} unimplemented={:?}",
        s.segs[1].selector, cpu.stats.unimplemented
    ));
    out
}
