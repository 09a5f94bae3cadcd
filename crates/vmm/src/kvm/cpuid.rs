//! The CPUID a vCPU sees: what KVM supports (`KVM_GET_SUPPORTED_CPUID`),
//! filtered to a coherent set for a machine of `count` vCPUs: each vCPU its
//! own APIC ID, one core per vCPU in one package, the hypervisor bit on, no
//! PMU, and KVM's paravirtual leaves (kvmclock) left in place.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const HYPERVISOR_BIT: u32 = 1 << 31; // leaf 1 ECX
const HTT_BIT: u32 = 1 << 28; // leaf 1 EDX
const X2APIC_BIT: u32 = 1 << 21; // leaf 1 ECX
const TSC_DEADLINE_BIT: u32 = 1 << 24; // leaf 1 ECX

/// Adjust `entries` (KVM's supported set) for vCPU `id` of `count`.
pub fn filter(entries: &mut [kvm_cpuid_entry2], id: u32, count: u32) {
    let count = count.max(1);
    // Bits needed to number `count` cores.
    let core_bits = 32 - (count - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: APIC ID (31:24), logical processors (23:16), CLFLUSH size 8 qwords.
                e.ebx = (id << 24) | (count.min(255) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= HYPERVISOR_BIT;
                // x2APIC and the TSC deadline timer are what KVM's LAPIC emulates.
                e.ecx |= X2APIC_BIT | TSC_DEADLINE_BIT;
                if count > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            4 => {
                // Intel deterministic cache parameters: cores per package.
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1).min(63) << 26);
            }
            6 => {
                // No power management the VMM would have to emulate; keep
                // ARAT (the APIC timer runs in deep C-states, as KVM's does).
                e.eax &= 1 << 2;
                e.ecx = 0;
            }
            0xa => {
                // No architectural PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 SMT (1 thread), level 1 cores.
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = 0x201;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i & 0xff;
                    }
                }
            }
            0x8000_0001 => {
                // AMD: no core performance counters, no extended topology claims
                // beyond what leaf 0x80000008 states.
                e.ecx &= !(1 << 23); // PerfCtrExtCore
            }
            0x8000_0008 => {
                // AMD: number of cores - 1 (ECX 7:0) and the APIC ID size (15:12).
                e.ecx = (core_bits << 12) | (count - 1).min(255);
            }
            0x8000_001e => {
                // AMD extended APIC ID; one thread per core, core = id.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// KVM's supported CPUID, filtered for vCPU `id` of `count`.
pub fn for_vcpu(supported: &CpuId, id: u32, count: u32) -> Result<CpuId, super::KvmError> {
    let mut entries = supported.as_slice().to_vec();
    filter(&mut entries, id, count);
    CpuId::from_entries(&entries).map_err(|e| super::KvmError::Setup(format!("CPUID: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology_is_coherent() {
        let mut e = vec![
            leaf(1, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0x8000_0008, 0),
            leaf(0xa, 0),
        ];
        e[4].eax = 0x0804_8002;
        filter(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert!(e[0].ecx & HYPERVISOR_BIT != 0);
        assert!(e[0].edx & HTT_BIT != 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2);
        assert_eq!(e[3].ecx & 0xff, 3);
        assert_eq!(e[4].eax, 0);
        let mut one = vec![leaf(1, 0)];
        one[0].edx = HTT_BIT;
        filter(&mut one, 0, 1);
        assert_eq!(one[0].edx & HTT_BIT, 0);
    }
}
