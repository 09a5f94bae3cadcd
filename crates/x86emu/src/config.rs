//! CPU model: the CPUID answers and the features they promise.
//!
//! The feature set is coherent by construction: every bit offered here is
//! implemented by the emulator, and the VMM can only remove bits (never add
//! ones the emulator lacks).

use serde::{Deserialize, Serialize};

/// Features the VMM may switch off. Everything else in CPUID is fixed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    pub sse3: bool,
    pub ssse3: bool,
    pub cx16: bool,
    pub popcnt: bool,
    pub nx: bool,
    pub pdpe1gb: bool,
    pub rdtscp: bool,
    pub smep: bool,
    pub smap: bool,
    pub tsc_deadline: bool,
    pub x2apic: bool,
    /// Advertise the hypervisor bit and the 0x4000_0000 leaves.
    pub hypervisor: bool,
}

impl Default for Features {
    fn default() -> Self {
        Features {
            sse3: true,
            ssse3: true,
            cx16: true,
            popcnt: false,
            nx: true,
            pdpe1gb: true,
            rdtscp: false,
            smep: false,
            smap: false,
            tsc_deadline: true,
            x2apic: false,
            hypervisor: true,
        }
    }
}

/// Static configuration of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuConfig {
    pub apic_id: u32,
    /// Number of vCPUs in the machine (CPUID topology).
    pub cpu_count: u32,
    /// TSC frequency reported through CPUID 0x15/0x16 and 0x4000_0010, in kHz.
    pub tsc_khz: u32,
    pub features: Features,
    /// The JIT tier: translate a block to host code after it ran this
    /// many times (0: at once); `None` interprets everything. Only on
    /// x86-64 hosts. Not guest-visible.
    #[serde(default)]
    pub jit: Option<u32>,
}

/// The core crystal clock advertised in CPUID 0x15 and as the bus
/// frequency in 0x4000_0010: the LAPIC timer's input clock, in Hz.
pub const CRYSTAL_HZ: u32 = 1_000_000_000;

/// CPUID 0x15: TSC = crystal * EBX / EAX. Linux also takes the crystal as
/// the LAPIC timer's rate, so it is [`CRYSTAL_HZ`], the rate the VMM's
/// LAPIC timer counts at. Linux multiplies crystal kHz by EBX in 32 bits,
/// so the ratio is reduced; where it still would not fit, the crystal is
/// given as the TSC itself (ratio 1), as before.
fn tsc_crystal_leaf(tsc_khz: u32) -> [u32; 4] {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let crystal_khz = CRYSTAL_HZ / 1000;
    let g = gcd(tsc_khz, crystal_khz).max(1);
    let (num, den) = (tsc_khz / g, crystal_khz / g);
    if tsc_khz > 0 && crystal_khz.checked_mul(num).is_some() {
        [den, num, CRYSTAL_HZ, 0]
    } else {
        [1, 1, tsc_khz.saturating_mul(1000), 0]
    }
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            apic_id: 0,
            cpu_count: 1,
            tsc_khz: 2_000_000,
            features: Features::default(),
            jit: None,
        }
    }
}

/// IA32_ARCH_CAPABILITIES (MSR 0x10a, offered through CPUID.7.0:EDX[29]):
/// the "not affected" bits that hold for x86emu. It executes one
/// instruction at a time and never speculates: no load runs ahead of its
/// permission check, no buffer or predictor carries data across a privilege
/// or address-space change. Without this MSR Linux assumes the worst of an
/// Intel CPU under a hypervisor and turns on page-table isolation, VERW on
/// every return to user space, and the ITS return thunks (docs/EMU-PERF.md).
/// Not claimed: IBRS_ALL (it would need SPEC_CTRL, which is not offered),
/// and every bit that announces a control MSR or a mitigation (TSX_CTRL,
/// FB_CLEAR, GDS_CTRL, RFDS_CLEAR) or a weakness (RSBA, RRSBA).
pub const ARCH_CAPABILITIES: u64 = (1 << 0) // RDCL_NO: no Meltdown (no PTI, no L1TF)
    | (1 << 3) // SKIP_L1DFL_VMENTRY: no L1D to flush for a nested hypervisor
    | (1 << 4) // SSB_NO: no speculative store bypass
    | (1 << 5) // MDS_NO: no microarchitectural data sampling (no VERW)
    | (1 << 6) // PSCHANGE_MC_NO: no iTLB multihit machine check
    | (1 << 8) // TAA_NO: no TSX asynchronous abort
    | (1 << 13) // SBDR_SSDP_NO: MMIO stale data, three bits together
    | (1 << 14) // FBSDP_NO
    | (1 << 15) // PSDP_NO
    | (1 << 24) // PBRSB_NO: no post-barrier return stack buffer prediction
    | (1 << 26) // GDS_NO: no gather data sampling
    | (1 << 27) // RFDS_NO: no register file data sampling
    | (1 << 62); // ITS_NO: no indirect target selection (no return thunks)

/// CPUID.7.0:EDX bit that announces [`ARCH_CAPABILITIES`].
pub const CPUID7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;

/// Vendor string "GenuineIntel" split into EBX, EDX, ECX.
const VENDOR: [u32; 3] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e];

fn bit(on: bool, n: u32) -> u32 {
    if on {
        1 << n
    } else {
        0
    }
}

impl CpuConfig {
    /// The CPUID answer for `leaf`/`subleaf` as (eax, ebx, ecx, edx).
    pub fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let f = &self.features;
        match leaf {
            0 => [0x16, VENDOR[0], VENDOR[2], VENDOR[1]],
            1 => {
                // Family 6, model 0x3a-ish signature; no real CPU quirks implied.
                let eax = 0x0003_06a9;
                let ebx = (self.apic_id << 24) | (self.cpu_count.min(255) << 16) | (8 << 8);
                let ecx = bit(f.sse3, 0)
                    | bit(f.ssse3, 9)
                    | bit(f.cx16, 13)
                    | bit(f.x2apic, 21)
                    | bit(f.popcnt, 23)
                    | bit(f.tsc_deadline, 24)
                    | bit(f.hypervisor, 31);
                // FPU VME? no. DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA
                // CMOV PAT PSE36 CLFSH MMX FXSR SSE SSE2 (HTT when SMP).
                let edx = (1 << 0)
                    | (1 << 3)
                    | (1 << 4)
                    | (1 << 5)
                    | (1 << 6)
                    | (1 << 8)
                    | (1 << 9)
                    | (1 << 11)
                    | (1 << 13)
                    | (1 << 15)
                    | (1 << 16)
                    | (1 << 19)
                    | (1 << 23)
                    | (1 << 24)
                    | (1 << 25)
                    | (1 << 26)
                    | bit(self.cpu_count > 1, 28);
                [eax, ebx, ecx, edx]
            }
            // No cache descriptors through leaf 2; leaf 4 describes none.
            2 => [1, 0, 0, 0],
            4 => [0, 0, 0, 0],
            7 if subleaf == 0 => [0, bit(f.smep, 7) | bit(f.smap, 20), 0, CPUID7_EDX_ARCH_CAPABILITIES],
            0xb => {
                // x2APIC topology: one thread per core, cpu_count cores.
                let shift = 32 - self.cpu_count.max(1).saturating_sub(1).leading_zeros();
                match subleaf {
                    0 => [0, 1, 0x100, self.apic_id],
                    1 => [shift, self.cpu_count, 0x201, self.apic_id],
                    _ => [0, 0, subleaf, self.apic_id],
                }
            }
            0x15 => tsc_crystal_leaf(self.tsc_khz),
            0x16 => {
                let mhz = self.tsc_khz / 1000;
                [mhz, mhz, 100, 0]
            }
            0x4000_0000 if f.hypervisor => [0x4000_0010, 0x7373_6556, 0x6d65_6c65, 0x7373_6556], // "VesselmeVess"
            0x4000_0010 if f.hypervisor => [self.tsc_khz, CRYSTAL_HZ / 1000, 0, 0],
            0x8000_0000 => [0x8000_0008, VENDOR[0], VENDOR[2], VENDOR[1]],
            0x8000_0001 => {
                // LAHF/SAHF in 64-bit mode; SYSCALL, NX, 1G pages, RDTSCP, LM.
                let ecx = 1;
                let edx = (1 << 11) | bit(f.nx, 20) | bit(f.pdpe1gb, 26) | bit(f.rdtscp, 27) | (1 << 29);
                [0, 0, ecx, edx]
            }
            0x8000_0002..=0x8000_0004 => {
                let name = b"Vessel x86emu virtual CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
                let base = (leaf - 0x8000_0002) as usize * 16;
                let w = |i: usize| u32::from_le_bytes(name[base + i * 4..base + i * 4 + 4].try_into().unwrap());
                [w(0), w(1), w(2), w(3)]
            }
            0x8000_0008 => [(48 << 8) | crate::mmu::PHYS_ADDR_BITS, 0, 0, 0],
            _ => [0, 0, 0, 0],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_features() {
        let c = CpuConfig::default();
        let [_, _, ecx, edx] = c.cpuid(1, 0);
        assert!(edx & (1 << 25) != 0 && edx & (1 << 26) != 0, "SSE and SSE2");
        assert!(ecx & 1 != 0 && ecx & (1 << 9) != 0, "SSE3 and SSSE3");
        // Not implemented, never offered: SSE4.1/4.2, AVX, XSAVE, MONITOR.
        assert_eq!(ecx & ((1 << 19) | (1 << 20) | (1 << 28) | (1 << 26) | (1 << 3)), 0);
        let [_, _, _, edx] = c.cpuid(0x8000_0001, 0);
        assert!(edx & (1 << 29) != 0, "long mode");
    }

    /// Linux computes TSC kHz as (ECX / 1000) * EBX / EAX in 32 bits and
    /// takes ECX as the LAPIC timer rate: both must come out right.
    #[test]
    fn tsc_leaf_survives_linux_arithmetic() {
        for tsc_khz in [2_000_000u32, 1_000_000, 2_500_000, 3_193_000, 1_234_567] {
            let c = CpuConfig {
                tsc_khz,
                ..CpuConfig::default()
            };
            let [eax, ebx, ecx, _] = c.cpuid(0x15, 0);
            let linux = (ecx / 1000).checked_mul(ebx).map(|p| p / eax);
            assert_eq!(linux, Some(tsc_khz), "tsc_khz {tsc_khz}: {eax} {ebx} {ecx}");
        }
        let [_, _, ecx, _] = CpuConfig::default().cpuid(0x15, 0);
        assert_eq!(ecx, CRYSTAL_HZ, "the crystal is the LAPIC timer's clock");
    }

    /// The MSR is announced, and says only "not affected": no bit that
    /// promises a control MSR or a mitigation x86emu does not have.
    #[test]
    fn arch_capabilities_are_announced_and_only_immunities() {
        let c = CpuConfig::default();
        assert_ne!(c.cpuid(7, 0)[3] & CPUID7_EDX_ARCH_CAPABILITIES, 0);
        // RDCL_NO, MDS_NO, TAA_NO, ITS_NO: no PTI, VERW or ITS thunks.
        for b in [0, 5, 8, 62] {
            assert_ne!(ARCH_CAPABILITIES & (1 << b), 0, "bit {b}");
        }
        // IBRS_ALL RSBA TSX_CTRL FB_CLEAR FB_CLEAR_CTRL RRSBA GDS_CTRL RFDS_CLEAR.
        for b in [1, 2, 7, 17, 18, 19, 25, 28] {
            assert_eq!(ARCH_CAPABILITIES & (1 << b), 0, "bit {b}");
        }
    }

    #[test]
    fn features_can_be_removed() {
        let mut c = CpuConfig::default();
        c.features.ssse3 = false;
        c.features.nx = false;
        assert_eq!(c.cpuid(1, 0)[2] & (1 << 9), 0);
        assert_eq!(c.cpuid(0x8000_0001, 0)[3] & (1 << 20), 0);
    }
}
