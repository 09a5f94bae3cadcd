//! Delivery of exceptions and interrupts through the IVT (real mode) or the
//! IDT (protected and long mode), with privilege-changing stack switches,
//! IST stacks, error codes, and the double/triple fault rules.

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{vector, ExecResult, Fault};
use crate::state::{flags, Seg, Segment};

/// What is being delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A fault or trap raised by the CPU.
    Exception,
    /// An external interrupt from the interrupt controller.
    External,
    Nmi,
    /// INT n, INT3, INTO: gate DPL is checked against CPL.
    Software,
}

impl Cpu {
    /// Deliver an event, escalating to #DF and triple fault as hardware does.
    pub(crate) fn deliver_event(&mut self, bus: &mut dyn Bus, kind: EventKind, vec: u8, code: Option<u32>) {
        self.end_block = true;
        if let Err(second) = self.try_deliver(bus, kind, vec, code) {
            if kind == EventKind::Exception && vec == vector::DF {
                self.triple_fault = true;
                return;
            }
            let first_contrib = Fault::new(vec).is_contributory();
            let double = (first_contrib && second.is_contributory())
                || (vec == vector::PF && (second.is_contributory() || second.vector == vector::PF));
            if let Some(a) = second.cr2 {
                self.state.cr2 = a;
            }
            if double {
                if self
                    .try_deliver(bus, EventKind::Exception, vector::DF, Some(0))
                    .is_err()
                {
                    self.triple_fault = true;
                }
            } else if self
                .try_deliver(bus, EventKind::Exception, second.vector, second.error_code)
                .is_err()
            {
                // A fault while delivering the second fault: treat as double.
                if self
                    .try_deliver(bus, EventKind::Exception, vector::DF, Some(0))
                    .is_err()
                {
                    self.triple_fault = true;
                }
            }
        }
    }

    pub(crate) fn try_deliver(&mut self, bus: &mut dyn Bus, kind: EventKind, vec: u8, code: Option<u32>) -> ExecResult {
        if kind == EventKind::Nmi {
            self.state.events.nmi_masked = true;
        }
        if !self.state.protected_mode() {
            return self.deliver_real(bus, vec);
        }
        if self.state.long_mode() {
            self.deliver_long(bus, kind, vec, code)
        } else {
            self.deliver_protected(bus, kind, vec, code)
        }
    }

    /// Real mode: IVT entry at vec*4, push FLAGS, CS, IP.
    fn deliver_real(&mut self, bus: &mut dyn Bus, vec: u8) -> ExecResult {
        let idt = self.state.idtr;
        let off = vec as u64 * 4;
        if off + 3 > idt.limit as u64 {
            return Err(Fault::gp((vec as u32) * 8 + 2));
        }
        let mut entry = [0u8; 4];
        self.read_system(bus, idt.base + off, &mut entry)?;
        let ip = u16::from_le_bytes([entry[0], entry[1]]);
        let cs = u16::from_le_bytes([entry[2], entry[3]]);
        let fl = self.state.rflags;
        self.push(bus, fl & 0xffff, 2)?;
        self.push(bus, self.state.seg(Seg::Cs).selector as u64, 2)?;
        self.push(bus, self.state.rip & 0xffff, 2)?;
        self.state.rflags &= !(flags::IF | flags::TF | flags::AC | flags::RF);
        *self.state.seg_mut(Seg::Cs) = Segment {
            selector: cs,
            base: (cs as u64) << 4,
            ..*self.state.seg(Seg::Cs)
        };
        self.state.rip = ip as u64;
        Ok(())
    }

    /// Read an IDT gate (8 bytes in legacy mode, 16 in long mode).
    fn read_gate(&mut self, bus: &mut dyn Bus, vec: u8, long: bool, kind: EventKind) -> ExecResult<(u64, u64)> {
        let size = if long { 16 } else { 8 };
        let idt = self.state.idtr;
        let ext = if matches!(kind, EventKind::Software) { 0 } else { 1 };
        let gp = Fault::gp(vec as u32 * 8 + 2 + ext);
        if vec as u64 * size + size - 1 > idt.limit as u64 {
            return Err(gp);
        }
        let mut b = [0u8; 16];
        self.read_system(bus, idt.base.wrapping_add(vec as u64 * size), &mut b[..size as usize])?;
        let lo = u64::from_le_bytes(b[..8].try_into().unwrap());
        let hi = u64::from_le_bytes(b[8..].try_into().unwrap());
        Ok((lo, hi))
    }

    /// Load a code segment descriptor for a gate target.
    fn load_code_descriptor(&mut self, bus: &mut dyn Bus, selector: u16, ext: u32) -> ExecResult<Segment> {
        if selector & !3 == 0 {
            return Err(Fault::gp(ext));
        }
        let raw = self
            .read_descriptor(bus, selector)
            .map_err(|_| Fault::gp((selector as u32 & !3) | ext))?;
        let seg = Segment::from_descriptor(selector, raw);
        if !seg.is_code() {
            return Err(Fault::gp((selector as u32 & !3) | ext));
        }
        if !seg.present {
            return Err(Fault::with_code(vector::NP, (selector as u32 & !3) | ext));
        }
        Ok(seg)
    }

    /// Read the 8-byte descriptor for a selector from the GDT or LDT.
    pub fn read_descriptor(&mut self, bus: &mut dyn Bus, selector: u16) -> ExecResult<u64> {
        let (base, limit) = if selector & 4 != 0 {
            (self.state.ldtr.base, self.state.ldtr.limit as u64)
        } else {
            (self.state.gdtr.base, self.state.gdtr.limit as u64)
        };
        let off = (selector & !7) as u64;
        if off + 7 > limit {
            return Err(Fault::gp(selector as u32 & !3));
        }
        let mut b = [0u8; 8];
        self.read_system(bus, base.wrapping_add(off), &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Read a 16-byte system descriptor (TSS/LDT in long mode).
    pub fn read_descriptor_wide(&mut self, bus: &mut dyn Bus, selector: u16) -> ExecResult<(u64, u64)> {
        let lo = self.read_descriptor(bus, selector)?;
        let limit = self.state.gdtr.limit as u64;
        let off = (selector & !7) as u64 + 8;
        if off + 7 > limit {
            return Err(Fault::gp(selector as u32 & !3));
        }
        let mut b = [0u8; 8];
        self.read_system(bus, self.state.gdtr.base.wrapping_add(off), &mut b)?;
        Ok((lo, u64::from_le_bytes(b)))
    }

    fn check_gate(&self, kind: EventKind, vec: u8, gate_dpl: u8, present: bool) -> ExecResult {
        let ext = if kind == EventKind::Software { 0 } else { 1 };
        if kind == EventKind::Software && gate_dpl < self.state.cpl() {
            return Err(Fault::gp(vec as u32 * 8 + 2));
        }
        if !present {
            return Err(Fault::with_code(vector::NP, vec as u32 * 8 + 2 + ext));
        }
        Ok(())
    }

    /// Long mode: 16-byte gates, 64-bit frames, IST, RSP0 from the TSS.
    fn deliver_long(&mut self, bus: &mut dyn Bus, kind: EventKind, vec: u8, code: Option<u32>) -> ExecResult {
        let (lo, hi) = self.read_gate(bus, vec, true, kind)?;
        let gate_type = ((lo >> 40) & 0xf) as u8;
        let dpl = ((lo >> 45) & 3) as u8;
        let present = lo & (1 << 47) != 0;
        if gate_type != 0xe && gate_type != 0xf {
            return Err(Fault::gp(vec as u32 * 8 + 2));
        }
        self.check_gate(kind, vec, dpl, present)?;
        let selector = (lo >> 16) as u16;
        let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
        let ist = (lo >> 32) & 7;
        let ext = if kind == EventKind::Software { 0 } else { 1 };
        let cs = self.load_code_descriptor(bus, selector, ext)?;
        if !cs.l || cs.db {
            return Err(Fault::gp(selector as u32 & !3));
        }
        let cpl = self.state.cpl();
        let new_cpl = if cs.type_ & 4 != 0 { cpl } else { cs.dpl }; // conforming keeps CPL
        if new_cpl > cpl {
            return Err(Fault::gp(selector as u32 & !3));
        }
        let old_ss = self.state.seg(Seg::Ss).selector as u64;
        let old_rsp = self.state.gpr[4];
        let old_cs = self.state.seg(Seg::Cs).selector as u64;
        let old_rflags = self.state.rflags;
        let mut rsp = old_rsp;
        if ist != 0 {
            rsp = self.read_tss64(bus, 0x24 + (ist - 1) * 8)?;
        } else if new_cpl < cpl {
            rsp = self.read_tss64(bus, 4 + new_cpl as u64 * 8)?;
        }
        rsp &= !0xf;
        let mut frame = [old_ss, old_rsp, old_rflags, old_cs, self.state.rip, 0];
        let mut n = 5;
        if let Some(c) = code {
            frame[5] = c as u64;
            n = 6;
        }
        // Write the frame (highest address first) before changing any state.
        let user = false;
        for (i, v) in frame[..n].iter().enumerate() {
            let addr = rsp.wrapping_sub(8 * (i as u64 + 1));
            if !crate::memory::is_canonical(addr) {
                return Err(Fault::ss0());
            }
            self.write_linear(bus, addr, &v.to_le_bytes(), user)?;
        }
        rsp = rsp.wrapping_sub(8 * n as u64);
        if new_cpl < cpl {
            // SS becomes a null selector with the new RPL.
            *self.state.seg_mut(Seg::Ss) = Segment {
                selector: new_cpl as u16,
                unusable: true,
                dpl: new_cpl,
                ..Default::default()
            };
        }
        let mut cs = cs;
        cs.selector = (selector & !3) | new_cpl as u16;
        cs.dpl = new_cpl;
        *self.state.seg_mut(Seg::Cs) = cs;
        self.state.gpr[4] = rsp;
        self.state.rip = target;
        self.state.rflags &= !(flags::TF | flags::NT | flags::RF | flags::VM);
        if gate_type == 0xe {
            self.state.rflags &= !flags::IF;
        }
        self.tlb_context_changed(cpl, new_cpl);
        Ok(())
    }

    fn read_tss64(&mut self, bus: &mut dyn Bus, off: u64) -> ExecResult<u64> {
        let tr = self.state.tr;
        if off + 7 > tr.limit as u64 {
            return Err(Fault::with_code(vector::TS, tr.selector as u32 & !3));
        }
        let mut b = [0u8; 8];
        self.read_system(bus, tr.base.wrapping_add(off), &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// 32-bit protected mode: 8-byte gates, 32-bit frames, SS:ESP from the TSS.
    fn deliver_protected(&mut self, bus: &mut dyn Bus, kind: EventKind, vec: u8, code: Option<u32>) -> ExecResult {
        let (lo, _) = self.read_gate(bus, vec, false, kind)?;
        let gate_type = ((lo >> 40) & 0x1f) as u8 & 0xf;
        let dpl = ((lo >> 45) & 3) as u8;
        let present = lo & (1 << 47) != 0;
        let is32 = gate_type & 8 != 0;
        if !matches!(gate_type, 0x6 | 0x7 | 0xe | 0xf) {
            // Task gates are not supported: no Linux guest uses them.
            return Err(Fault::gp(vec as u32 * 8 + 2));
        }
        self.check_gate(kind, vec, dpl, present)?;
        let selector = (lo >> 16) as u16;
        let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        let ext = if kind == EventKind::Software { 0 } else { 1 };
        let cs = self.load_code_descriptor(bus, selector, ext)?;
        let cpl = self.state.cpl();
        let new_cpl = if cs.type_ & 4 != 0 { cpl } else { cs.dpl };
        if new_cpl > cpl {
            return Err(Fault::gp(selector as u32 & !3));
        }
        let size = if is32 { 4 } else { 2 };
        let old_ss = self.state.seg(Seg::Ss).selector as u64;
        let old_esp = self.state.gpr[4];
        let old_cs = self.state.seg(Seg::Cs).selector as u64;
        let old_flags = self.state.rflags;
        let old_ip = self.state.rip;
        let saved_ss = *self.state.seg(Seg::Ss);
        if new_cpl < cpl {
            // Load SS:ESP for the new level from the 32-bit TSS.
            let tr = self.state.tr;
            let off = 4 + new_cpl as u64 * 8;
            let mut b = [0u8; 8];
            if off + 5 > tr.limit as u64 {
                return Err(Fault::with_code(vector::TS, tr.selector as u32 & !3));
            }
            self.read_system(bus, tr.base + off, &mut b)?;
            let esp = u32::from_le_bytes(b[..4].try_into().unwrap()) as u64;
            let ss_sel = u16::from_le_bytes([b[4], b[5]]);
            let raw = self
                .read_descriptor(bus, ss_sel)
                .map_err(|_| Fault::with_code(vector::TS, ss_sel as u32 & !3))?;
            *self.state.seg_mut(Seg::Ss) = Segment::from_descriptor(ss_sel, raw);
            self.state.gpr[4] = esp;
            let r = (|| -> ExecResult {
                self.push(bus, old_ss, size)?;
                self.push(bus, old_esp, size)?;
                Ok(())
            })();
            if let Err(e) = r {
                *self.state.seg_mut(Seg::Ss) = saved_ss;
                self.state.gpr[4] = old_esp;
                return Err(e);
            }
        }
        let r = (|| -> ExecResult {
            self.push(bus, old_flags, size)?;
            self.push(bus, old_cs, size)?;
            self.push(bus, old_ip, size)?;
            if let Some(c) = code {
                self.push(bus, c as u64, size)?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            *self.state.seg_mut(Seg::Ss) = saved_ss;
            self.state.gpr[4] = old_esp;
            return Err(e);
        }
        let mut cs = cs;
        cs.selector = (selector & !3) | new_cpl as u16;
        cs.dpl = new_cpl;
        *self.state.seg_mut(Seg::Cs) = cs;
        self.state.rip = if is32 { target } else { target & 0xffff };
        self.state.rflags &= !(flags::TF | flags::NT | flags::RF | flags::VM);
        if gate_type & 7 == 6 {
            self.state.rflags &= !flags::IF;
        }
        self.tlb_context_changed(cpl, new_cpl);
        Ok(())
    }

    /// CPL changes do not need TLB flushes (the TLB is split by context),
    /// but the current block must end because code size may have changed.
    pub(crate) fn tlb_context_changed(&mut self, _old: u8, _new: u8) {
        self.end_block = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::CpuState;
    use crate::testbus::TestBus;

    /// Identity-map the first 2 MiB with one large page.
    fn identity_long_mode(bus: &mut TestBus) -> CpuState {
        bus.write_u64(0x1000, 0x2000 | 7);
        bus.write_u64(0x2000, 0x3000 | 7);
        bus.write_u64(0x3000, 0x87);
        let mut s = CpuState::long_mode_flat(0x1000);
        // GDT at 0x5000: null, null, kernel CS (0x10), kernel DS (0x18), TSS at 0x40.
        bus.write_u64(0x5010, 0x00af_9b00_0000_ffff);
        bus.write_u64(0x5018, 0x00cf_9300_0000_ffff);
        s.gdtr.base = 0x5000;
        s.gdtr.limit = 0x7f;
        s.idtr.base = 0x6000;
        s.idtr.limit = 0xfff;
        s.tr.base = 0x7000;
        s.tr.limit = 0x67;
        s
    }

    fn set_gate64(bus: &mut TestBus, vec: u8, target: u64, ist: u64, dpl: u64) {
        let lo = (target & 0xffff)
            | (0x10 << 16)
            | (ist << 32)
            | (0xe << 40)
            | (dpl << 45)
            | (1 << 47)
            | ((target & 0xffff_0000) << 32);
        bus.write_u64(0x6000 + vec as u64 * 16, lo);
        bus.write_u64(0x6000 + vec as u64 * 16 + 8, target >> 32);
    }

    #[test]
    fn long_mode_exception_frame_with_error_code() {
        let mut bus = TestBus::new(1 << 21);
        let s = identity_long_mode(&mut bus);
        set_gate64(&mut bus, 13, 0x9000, 0, 0);
        let mut cpu = Cpu::standalone(1 << 21);
        cpu.set_state(s);
        cpu.state.rip = 0x8000;
        cpu.state.gpr[4] = 0x10_0008; // not 16-byte aligned: the CPU aligns it
        cpu.state.rflags = flags::FIXED1 | flags::IF;
        cpu.deliver_event(&mut bus, EventKind::Exception, 13, Some(0x28));
        assert_eq!(cpu.state.rip, 0x9000);
        assert_eq!(cpu.state.gpr[4], 0x10_0000 - 48);
        let sp = cpu.state.gpr[4];
        assert_eq!(bus.read_u64(sp), 0x28);
        assert_eq!(bus.read_u64(sp + 8), 0x8000);
        assert_eq!(bus.read_u64(sp + 16), 0x10);
        assert_eq!(bus.read_u64(sp + 24), flags::FIXED1 | flags::IF);
        assert_eq!(bus.read_u64(sp + 32), 0x10_0008);
        assert_eq!(bus.read_u64(sp + 40), 0x18);
        assert_eq!(cpu.state.rflags & flags::IF, 0);
    }

    #[test]
    fn ist_stack_is_used() {
        let mut bus = TestBus::new(1 << 21);
        let s = identity_long_mode(&mut bus);
        set_gate64(&mut bus, 2, 0x9100, 2, 0);
        bus.write_u64(0x7000 + 0x24 + 8, 0x18_0000); // IST2
        let mut cpu = Cpu::standalone(1 << 21);
        cpu.set_state(s);
        cpu.state.gpr[4] = 0x10_0000;
        cpu.inject_nmi();
        bus.load(0x9100, &[0xf4]);
        cpu.state.rip = 0x9100;
        cpu.run(&mut bus, 1);
        assert_eq!(cpu.state.gpr[4], 0x18_0000 - 40);
        assert!(cpu.state.events.nmi_masked);
    }

    #[test]
    fn missing_gate_escalates_to_double_then_triple_fault() {
        let mut bus = TestBus::new(1 << 21);
        let mut s = identity_long_mode(&mut bus);
        s.idtr.limit = 0; // no usable gates at all
        let mut cpu = Cpu::standalone(1 << 21);
        cpu.set_state(s);
        cpu.state.gpr[4] = 0x10_0000;
        cpu.deliver_event(&mut bus, EventKind::Exception, 13, Some(0));
        assert!(cpu.triple_fault);
    }

    /// An event whose delivery shuts the CPU down stops it before the next
    /// instruction, whatever the budget (it used to run on to the end of
    /// the block chain, so the interpreter and the JIT stopped at
    /// different places).
    #[test]
    fn failed_nmi_delivery_stops_before_the_next_instruction() {
        for budget in [1, 3, 500] {
            let mut bus = TestBus::new(1 << 21);
            let mut s = identity_long_mode(&mut bus);
            s.idtr.limit = 0;
            bus.load(0x8000, &[0xff, 0xc0, 0xeb, 0xfc]); // inc eax; jmp $-2
            let mut cpu = Cpu::standalone(1 << 21);
            cpu.set_state(s);
            cpu.state.rip = 0x8000;
            cpu.state.gpr[4] = 0x10_0000;
            cpu.inject_nmi();
            assert_eq!(cpu.run(&mut bus, budget), crate::Exit::TripleFault, "budget {budget}");
            assert_eq!(cpu.instret, 0, "budget {budget}");
            assert_eq!(cpu.state.gpr[0], 0, "budget {budget}");
        }
    }

    #[test]
    fn page_fault_during_delivery_gives_double_fault() {
        let mut bus = TestBus::new(1 << 21);
        let s = identity_long_mode(&mut bus);
        set_gate64(&mut bus, 14, 0x9000, 0, 0);
        set_gate64(&mut bus, 8, 0x9800, 1, 0);
        bus.write_u64(0x7000 + 0x24, 0x18_0000); // IST1 for #DF
        let mut cpu = Cpu::standalone(1 << 21);
        cpu.set_state(s);
        cpu.state.gpr[4] = 0x40_0000; // unmapped stack
        cpu.deliver_event(&mut bus, EventKind::Exception, 14, Some(2));
        assert_eq!(cpu.state.rip, 0x9800);
        assert!(!cpu.triple_fault);
    }

    #[test]
    fn real_mode_ivt_delivery() {
        let mut bus = TestBus::new(1 << 20);
        let mut cpu = Cpu::standalone(1 << 20);
        cpu.state.segs[1] = Segment::real_mode(0x100, true);
        cpu.state.segs[2] = Segment::real_mode(0, false);
        cpu.state.rip = 0x10;
        cpu.state.gpr[4] = 0x8000;
        cpu.state.rflags = flags::FIXED1 | flags::IF;
        bus.write_u32(0x20 * 4, 0x2000_0300); // 2000:0300
        cpu.deliver_event(&mut bus, EventKind::External, 0x20, None);
        assert_eq!(cpu.state.seg(Seg::Cs).base, 0x20000);
        assert_eq!(cpu.state.rip, 0x300);
        assert_eq!(cpu.state.gpr[4], 0x8000 - 6);
        assert_eq!(bus.ram()[0x7ffa], 0x10);
        assert_eq!(cpu.state.rflags & flags::IF, 0);
    }
}
