//! The machine: guest memory, devices on the port and MMIO buses, and the
//! boot vCPU run loop for the `emu` engine.
//!
//! Status: one vCPU, serial console and i8042 reset. The interrupt
//! controllers, timers and SMP arrive with the rest of the boot work.

use std::io::Write;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use x86emu::{Bus, CodeMap, Cpu, CpuConfig, Exit};

use crate::boot::{self, BootSpec};
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::{SerialPort, COM1_BASE};
use crate::memory;
use crate::Result;

/// What to run.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_size: u64,
    pub cpus: u32,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`).
    Reset,
    /// The guest halted with interrupts disabled: nothing can wake it.
    HaltedForever,
    /// A triple fault; the registers at the time, formatted.
    TripleFault(String),
}

/// Devices and memory as the CPU sees them.
pub struct MachineBus {
    mem: GuestMemoryMmap,
    pub serial: SerialPort<Box<dyn Write + Send>>,
    pub i8042: I8042,
}

// SAFETY: `ram_page` returns pointers into the mmap'd regions of `mem`,
// which are never unmapped or resized while the bus (which owns `mem`)
// lives; each returned page lies wholly inside one region because regions
// are page aligned and page sized multiples.
unsafe impl Bus for MachineBus {
    fn ram_page(&mut self, gpa: u64) -> Option<NonNull<u8>> {
        let region = self.mem.find_region(GuestAddress(gpa))?;
        let off = gpa - region.start_addr().0;
        if off + x86emu::bus::PAGE_SIZE > region.len() {
            return None;
        }
        let host = region.get_host_address(MemoryRegionAddress(off)).ok()?;
        NonNull::new(host)
    }

    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}

    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        let mask = if size >= 4 { u32::MAX } else { (1u32 << (size * 8)) - 1 };
        let v = match port {
            COM1_BASE..=0x3ff => self.serial.read(port) as u32,
            i8042::DATA_PORT | i8042::STATUS_PORT => self.i8042.read(port) as u32,
            _ => u32::MAX,
        };
        v & mask
    }

    fn io_out(&mut self, port: u16, _size: u8, value: u32) {
        match port {
            COM1_BASE..=0x3ff => self.serial.write(port, value as u8),
            i8042::DATA_PORT | i8042::STATUS_PORT => self.i8042.write(port, value as u8),
            _ => {}
        }
    }

    fn tsc(&mut self, _instret: u64) -> u64 {
        host_tsc()
    }

    fn exit_requested(&mut self) -> bool {
        self.i8042.reset_requested
    }
}

/// The host's time in TSC units at the advertised frequency (2 GHz).
fn host_tsc() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    let ns = START.get_or_init(Instant::now).elapsed().as_nanos() as u64;
    ns.saturating_mul(2)
}

pub struct Machine {
    pub cpu: Cpu,
    pub bus: MachineBus,
}

impl Machine {
    pub fn new(cfg: &MachineConfig, console: Box<dyn Write + Send>) -> Result<Self> {
        if cfg.cpus != 1 {
            return Err(crate::Error::Config("only --cpus 1 is supported so far".into()));
        }
        let mem = memory::create(cfg.mem_size)?;
        let state = boot::load(
            &mem,
            &BootSpec {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: &cfg.cmdline,
                mem_size: cfg.mem_size,
            },
        )?;
        let limit = mem.last_addr().0 + 1;
        let mut cpu = Cpu::new(CpuConfig::default(), Arc::new(CodeMap::new(limit)));
        cpu.set_state(state);
        Ok(Machine {
            cpu,
            bus: MachineBus {
                mem,
                serial: SerialPort::new(console),
                i8042: I8042::default(),
            },
        })
    }

    /// Run the boot vCPU until the guest ends.
    pub fn run(&mut self) -> RunOutcome {
        loop {
            match self.cpu.run(&mut self.bus, 1_000_000) {
                Exit::Budget => {}
                Exit::ExitRequested => return RunOutcome::Reset,
                Exit::Halted => {
                    if !self.cpu.interrupts_enabled() {
                        return RunOutcome::HaltedForever;
                    }
                    // No interrupt sources yet: nothing will ever wake it.
                    return RunOutcome::HaltedForever;
                }
                Exit::TripleFault => return RunOutcome::TripleFault(format_regs(&self.cpu)),
                Exit::WaitForSipi | Exit::Shutdown => return RunOutcome::HaltedForever,
            }
        }
    }
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
