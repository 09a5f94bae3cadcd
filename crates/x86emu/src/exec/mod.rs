//! Instruction execution. Each file handles one class of instructions and
//! registers a handler per mnemonic; the decoder stores the handler next to
//! each decoded instruction, so dispatch is one indirect call.

use std::sync::OnceLock;

use iced_x86::{Instruction, Mnemonic};

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{ExecResult, Fault};

pub mod alu;
pub mod bits;
pub mod data;
pub mod fast;
pub mod flags;
pub mod flow;
pub mod sse;
pub mod string;
pub mod system;
pub mod x87;

/// Executes one instruction. RIP already points past it; on `Err` the CPU
/// rolls RIP back and delivers the fault.
pub type Handler = fn(&mut Cpu, &mut dyn Bus, &Instruction) -> ExecResult;

/// The handler table being built: one slot per mnemonic.
pub struct Registry {
    slots: Vec<Option<(Handler, &'static str)>>,
}

impl Registry {
    fn new() -> Self {
        Registry {
            slots: vec![None; Mnemonic::values().count()],
        }
    }

    /// Register `h` for `m`. `group` names the file, to report clashes.
    pub fn add(&mut self, m: Mnemonic, group: &'static str, h: Handler) {
        let slot = &mut self.slots[m as usize];
        if let Some((_, other)) = slot {
            panic!("mnemonic {m:?} registered by both {other} and {group}");
        }
        *slot = Some((h, group));
    }

    /// Register one handler for several mnemonics.
    pub fn add_all(&mut self, ms: &[Mnemonic], group: &'static str, h: Handler) {
        for &m in ms {
            self.add(m, group, h);
        }
    }
}

fn build() -> Vec<Handler> {
    let mut r = Registry::new();
    alu::register(&mut r);
    bits::register(&mut r);
    data::register(&mut r);
    flow::register(&mut r);
    sse::register(&mut r);
    string::register(&mut r);
    system::register(&mut r);
    x87::register(&mut r);
    r.slots
        .into_iter()
        .map(|s| s.map_or(unimplemented as Handler, |(h, _)| h))
        .collect()
}

static TABLE: OnceLock<Vec<Handler>> = OnceLock::new();

/// The handler for a mnemonic (raises #UD and counts it when unimplemented).
pub fn handler_for(m: Mnemonic) -> Handler {
    TABLE.get_or_init(build)[m as usize]
}

/// The handler for a decoded instruction. iced names both the string
/// MOVSD/CMPSD and the SSE2 scalar-double ones `Movsd`/`Cmpsd`; the string
/// forms go to exec/string.rs here, so the mnemonic slots stay free for SSE.
pub fn handler_for_instruction(ins: &Instruction) -> Handler {
    match ins.code() {
        iced_x86::Code::Movsd_m32_m32 => string::movs,
        iced_x86::Code::Cmpsd_m32_m32 => string::cmps,
        _ => fast::specialize(ins).unwrap_or_else(|| handler_for(ins.mnemonic())),
    }
}

/// Whether a mnemonic has a handler.
pub fn is_implemented(m: Mnemonic) -> bool {
    handler_for(m) as usize != unimplemented as Handler as usize
}

fn unimplemented(cpu: &mut Cpu, _bus: &mut dyn Bus, ins: &Instruction) -> ExecResult {
    Err(cpu.unimplemented(ins.mnemonic()))
}

/// Bytes that do not decode: #UD, as on hardware.
pub fn invalid(_cpu: &mut Cpu, _bus: &mut dyn Bus, _ins: &Instruction) -> ExecResult {
    Err(Fault::ud())
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_builds_without_clashes() {
        let n = super::build().len();
        assert!(n > 1000);
    }
}
