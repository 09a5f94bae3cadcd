//! Lockstep: the interpreter checks every run of translated code.
//!
//! Turned on with the environment variable `VESSEL_JIT_LOCKSTEP=FILE`
//! (with the JIT on). Before a translated block runs, a shadow CPU with
//! the same state runs the same decoded block in the interpreter, with the
//! same self-loop bounds as the translated code, on private copies of the
//! RAM pages it touches (the guest's RAM and the code map are left as they
//! were). Then the translated code runs for real and the two are compared:
//! the whole `CpuState`, the instruction count, and every page the shadow
//! touched. A block run in which the shadow reached a device (MMIO, port
//! I/O, an MSR or the TSC from the bus, CR8) is not compared, as the
//! device would see the access twice. The first divergence (RIP, the
//! block's instructions, what differs) is printed to stderr and written to
//! FILE with the counts; the counts are written again when the CPU is
//! dropped. One vCPU only: another vCPU's stores between the two runs
//! would look like a divergence.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ptr::NonNull;

use crate::bus::{Bus, PAGE_SIZE};
use crate::codemap::CodeMap;
use crate::cpu::Cpu;
use crate::decode::Block;
use crate::state::{flags, CpuState};

#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE as usize]);

/// Lockstep's state, per CPU.
pub(crate) struct Lockstep {
    shadow: Box<Cpu>,
    report: std::path::PathBuf,
    /// Block runs compared, and skipped because they reached a device.
    compared: u64,
    skipped: u64,
    divergence: Option<String>,
    pages: HashMap<u64, Box<Page>>,
    /// Code-map tags of the pages the shadow touched, as they were.
    tags: Vec<(u64, u32)>,
}

/// What the shadow ran, kept until the translated run is compared.
pub(crate) struct Pending {
    state: CpuState,
    executed: u64,
}

impl Lockstep {
    /// Lockstep for a CPU with `cpu`'s configuration, if the environment
    /// asks for it.
    pub(crate) fn from_env(cpu: &Cpu) -> Option<Box<Lockstep>> {
        let report = std::env::var_os(crate::JIT_LOCKSTEP_ENV)?;
        Some(Lockstep::new(cpu, report.into()))
    }

    /// Lockstep for a CPU with `cpu`'s configuration, reporting to `report`.
    pub(crate) fn new(cpu: &Cpu, report: std::path::PathBuf) -> Box<Lockstep> {
        let mut config = cpu.config.clone();
        config.jit = None;
        let shadow = Cpu::new(config, cpu.code_map.clone());
        Box::new(Lockstep {
            shadow: Box::new(shadow),
            report,
            compared: 0,
            skipped: 0,
            divergence: None,
            pages: HashMap::new(),
            tags: Vec::new(),
        })
    }

    /// The first divergence found, if any.
    #[cfg(test)]
    pub(crate) fn divergence(&self) -> Option<&str> {
        self.divergence.as_deref()
    }

    /// Run `block` in the shadow from `cpu`'s state, as translated code
    /// would run it with `allowed` instructions. `None`: not comparable.
    pub(crate) fn shadow_run(&mut self, cpu: &Cpu, bus: &mut dyn Bus, block: &Block, allowed: u64) -> Option<Pending> {
        let shadow = &mut self.shadow;
        shadow.state = cpu.state.clone();
        shadow.instret = cpu.instret;
        // The shadow shares the machine's code map, so that stores to code
        // pages end its run as they end the translated one; the tags it
        // bumps are put back below.
        shadow.tlb.flush_all();
        shadow.end_block = false;
        shadow.code_written = false;
        shadow.triple_fault = false;
        self.pages.clear();
        self.tags.clear();
        let mut sbus = ShadowBus {
            real: bus,
            pages: &mut self.pages,
            tags: &mut self.tags,
            code_map: &cpu.code_map,
            device: false,
        };
        let n = block.instrs.len() as u64;
        let start = block.instrs[0].ins.ip();
        let home = super::emit::branches_home(block);
        let mut left = allowed;
        let mut executed = 0u64;
        // The translated code's loop: whole passes while the block jumps
        // back to its start, within the budget and `MAX_LOOPS`; it stops
        // after an instruction that faulted, ended the block, wrote code
        // or set TF.
        'run: for _ in 0..super::MAX_LOOPS {
            for d in block.instrs.iter() {
                executed += 1;
                if !shadow.step_decoded(&mut sbus, &d.ins, d.handler, u64::MAX) {
                    break 'run;
                }
                if shadow.end_block | shadow.code_written | (shadow.state.rflags & flags::TF != 0) {
                    break 'run;
                }
            }
            if !home || shadow.state.rip != start || left - n < n {
                break;
            }
            left -= n;
        }
        let device = sbus.device;
        for &(phys, tag) in self.tags.iter() {
            cpu.code_map.restore_tag(phys, tag);
        }
        if device {
            self.skipped += 1;
            return None;
        }
        Some(Pending {
            state: shadow.state.clone(),
            executed,
        })
    }

    /// Compare the translated run (`cpu` after it, `executed`
    /// instructions) with the shadow's.
    pub(crate) fn compare(&mut self, cpu: &Cpu, bus: &mut dyn Bus, block: &Block, p: Pending, executed: u64) {
        self.compared += 1;
        if self.divergence.is_some() {
            return;
        }
        let mut diff = String::new();
        if p.executed != executed {
            let _ = writeln!(diff, "instructions: interpreter {} JIT {}", p.executed, executed);
        }
        diff_state(&mut diff, &p.state, &cpu.state);
        let mut pages: Vec<_> = self.pages.iter().collect();
        pages.sort_by_key(|(a, _)| **a);
        for (&gpa, page) in pages {
            let Some(real) = bus.ram_page(gpa) else { continue };
            // SAFETY: the bus vouches for PAGE_SIZE bytes at `real`.
            let real = unsafe { std::slice::from_raw_parts(real.as_ptr(), PAGE_SIZE as usize) };
            if let Some(off) = (0..PAGE_SIZE as usize).find(|&i| real[i] != page.0[i]) {
                let _ = writeln!(
                    diff,
                    "memory at {:#x}: interpreter {:#04x} JIT {:#04x}",
                    gpa + off as u64,
                    page.0[off],
                    real[off]
                );
                break;
            }
        }
        if diff.is_empty() {
            return;
        }
        let mut text = format!(
            "JIT lockstep: first divergence after {} compared block runs, block at RIP {:#x}:\n",
            self.compared,
            block.instrs[0].ins.ip()
        );
        for d in block.instrs.iter() {
            let _ = writeln!(text, "  {:016x}  {}", d.ins.ip(), d.ins);
        }
        text.push_str(&diff);
        eprintln!("{text}");
        self.divergence = Some(text);
        self.write_report();
    }

    fn write_report(&self) {
        let text = format!(
            "compared {}\nskipped {}\n{}",
            self.compared,
            self.skipped,
            self.divergence.as_deref().unwrap_or("no divergence\n")
        );
        if let Err(e) = std::fs::write(&self.report, text) {
            eprintln!("JIT lockstep: cannot write {}: {e}", self.report.display());
        }
    }
}

impl Drop for Lockstep {
    fn drop(&mut self) {
        self.write_report();
    }
}

fn diff_state(out: &mut String, int: &CpuState, jit: &CpuState) {
    const NAMES: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    ];
    for (i, name) in NAMES.iter().enumerate() {
        if int.gpr[i] != jit.gpr[i] {
            let _ = writeln!(out, "{name}: interpreter {:#x} JIT {:#x}", int.gpr[i], jit.gpr[i]);
        }
    }
    if int.rip != jit.rip {
        let _ = writeln!(out, "rip: interpreter {:#x} JIT {:#x}", int.rip, jit.rip);
    }
    if int.rflags != jit.rflags {
        let _ = writeln!(out, "rflags: interpreter {:#x} JIT {:#x}", int.rflags, jit.rflags);
    }
    let (mut a, b) = (int.clone(), jit.clone());
    a.gpr = b.gpr;
    a.rip = b.rip;
    a.rflags = b.rflags;
    if a != b {
        let _ = writeln!(out, "other state: interpreter {a:?}\nJIT {b:?}");
    }
}

/// The shadow's bus: RAM pages are private copies; devices are not
/// reached (a read answers all ones) and make the run incomparable.
struct ShadowBus<'a> {
    real: &'a mut dyn Bus,
    pages: &'a mut HashMap<u64, Box<Page>>,
    tags: &'a mut Vec<(u64, u32)>,
    code_map: &'a CodeMap,
    device: bool,
}

// SAFETY: every page handed out is a boxed, page-sized, page-aligned copy
// owned by `pages`, which is only cleared between shadow runs, after the
// shadow's TLB (the only holder of the pointers) is flushed at the start
// of the next run.
unsafe impl Bus for ShadowBus<'_> {
    fn ram_page(&mut self, gpa: u64) -> Option<NonNull<u8>> {
        let page = gpa & !(PAGE_SIZE - 1);
        if let Some(p) = self.pages.get_mut(&page) {
            return NonNull::new(p.0.as_mut_ptr());
        }
        let real = self.real.ram_page(page)?;
        let mut copy = Box::new(Page([0; PAGE_SIZE as usize]));
        // SAFETY: the bus vouches for PAGE_SIZE bytes at `real`.
        unsafe { std::ptr::copy_nonoverlapping(real.as_ptr(), copy.0.as_mut_ptr(), PAGE_SIZE as usize) };
        self.tags.push((page, self.code_map.tag(page)));
        let p = NonNull::new(copy.0.as_mut_ptr());
        self.pages.insert(page, copy);
        p
    }

    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        self.device = true;
        data.fill(0xff);
    }

    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {
        self.device = true;
    }

    fn io_in(&mut self, _port: u16, _size: u8) -> u32 {
        self.device = true;
        u32::MAX
    }

    fn io_out(&mut self, _port: u16, _size: u8, _value: u32) {
        self.device = true;
    }

    fn rdmsr(&mut self, _index: u32) -> Option<u64> {
        self.device = true;
        Some(0)
    }

    fn wrmsr(&mut self, _index: u32, _value: u64) -> bool {
        self.device = true;
        true
    }

    fn tsc(&mut self, _instret: u64) -> u64 {
        self.device = true;
        0
    }

    fn interrupt_pending(&mut self) -> bool {
        self.device = true;
        false
    }

    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        self.device = true;
        None
    }

    fn set_task_priority(&mut self, _tpr: u8) {
        self.device = true;
    }
}
