//! `vessel snapshot inspect`: a snapshot's state in human form.

use std::fmt::Write;

use vmm::persist::{MachineState, FORMAT_VERSION};

fn device_name(ty: u32) -> &'static str {
    match ty {
        1 => "net",
        2 => "block",
        3 => "console",
        4 => "entropy",
        19 => "vsock",
        _ => "unknown",
    }
}

pub fn describe(s: &MachineState) -> String {
    let mut o = String::new();
    let c = &s.config;
    let _ = writeln!(
        o,
        "format:     Vessel snapshot version {FORMAT_VERSION}, written by Vessel {}",
        s.vessel_version
    );
    let _ = writeln!(o, "engine:     {}", s.engine);
    let _ = writeln!(o, "clock:      {:.3} s of machine time", s.clock_ns as f64 / 1e9);
    let _ = writeln!(o, "memory:     {} MiB", c.mem_size >> 20);
    let _ = writeln!(o, "kernel:     {}", c.kernel.display());
    if let Some(i) = &c.initrd {
        let _ = writeln!(o, "initrd:     {}", i.display());
    }
    let _ = writeln!(o, "cmdline:    {}", c.cmdline);
    let _ = writeln!(o, "cpu:        {}", s.cpu_features.names().join(" "));
    if let Some(k) = &s.kvm {
        let _ = writeln!(
            o,
            "kvm:        kvmclock at {:.3} s, {} XSAVE areas",
            k.clock_ns as f64 / 1e9,
            k.xsave.len()
        );
    }
    let _ = writeln!(o, "vcpus:      {}", s.cpus.len());
    for (i, cpu) in s.cpus.iter().enumerate() {
        let mode = if cpu.efer & (1 << 10) != 0 {
            "long mode"
        } else if cpu.cr0 & 1 != 0 {
            "protected mode"
        } else {
            "real mode"
        };
        let state = if cpu.events.wait_for_sipi {
            ", waiting for SIPI"
        } else if cpu.events.halted {
            ", halted"
        } else {
            ""
        };
        let _ = writeln!(o, "  vcpu{i}:    rip={:#x} {mode}{state}", cpu.rip);
    }
    let _ = writeln!(o, "devices:    {}", s.devices.len());
    let types: Vec<u32> = c
        .disks
        .iter()
        .map(|_| 2)
        .chain(c.nets.iter().map(|_| 1))
        .chain(c.rng.then_some(4))
        .chain(c.console_output.as_ref().map(|_| 3))
        .chain(c.vsock.as_ref().map(|_| 19))
        .collect();
    for (i, (d, ty)) in s.devices.iter().zip(types).enumerate() {
        let ready = d.queues.iter().filter(|q| q.ready).count();
        let _ = writeln!(
            o,
            "  virtio{i}:  {} status={:#x} features={:#x} queues ready {ready}/{}",
            device_name(ty),
            d.status,
            d.driver_features,
            d.queues.len()
        );
    }
    for (i, d) in s.disks.iter().enumerate() {
        let _ = writeln!(
            o,
            "  disk{i}:    {} ({}{})",
            d.path.display(),
            if d.read_only { "read-only, " } else { "" },
            if d.frozen {
                "frozen in the snapshot"
            } else {
                "not frozen: referenced by path"
            }
        );
    }
    for (i, n) in c.nets.iter().enumerate() {
        let _ = writeln!(
            o,
            "  net{i}:     tap {}",
            n.tap.as_deref().unwrap_or("(created at start)")
        );
    }
    o
}
