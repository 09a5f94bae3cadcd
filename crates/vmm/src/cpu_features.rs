//! The CPU features a guest sees through CPUID, as a snapshot records
//! them. A guest (its kernel, and every program that checks CPUID when it
//! starts) may use any feature it was offered, so a snapshot restores only
//! under an engine that offers all of them; restore names the missing ones.
//!
//! Compared: the feature words of leaves 1, 7 (subleaf 0) and 0x8000_0001.
//! Left out are bits that say something other than "this instruction or
//! register exists": OSXSAVE and OSPKE (copies of CR4 bits), the hypervisor
//! bit, HTT (topology), and the AMD copies of leaf 1's EDX in 0x8000_0001.

use serde::{Deserialize, Serialize};

/// The feature words of the CPUID a guest saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFeatures {
    pub leaf1_ecx: u32,
    pub leaf1_edx: u32,
    pub leaf7_ebx: u32,
    pub leaf7_ecx: u32,
    pub leaf7_edx: u32,
    pub ext1_ecx: u32,
    pub ext1_edx: u32,
}

/// Bits left out of the comparison (see the module comment), per word in
/// the order of [`CpuFeatures::words`].
const IGNORED: [u32; 7] = [
    (1 << 27) | (1 << 31), // OSXSAVE, hypervisor
    1 << 28,               // HTT
    0,
    1 << 4, // OSPKE
    0,
    0,
    0x0183_f3ff, // AMD's copies of leaf 1 EDX
];

const WORD_NAMES: [&str; 7] = [
    "CPUID.1:ECX",
    "CPUID.1:EDX",
    "CPUID.7.0:EBX",
    "CPUID.7.0:ECX",
    "CPUID.7.0:EDX",
    "CPUID.80000001:ECX",
    "CPUID.80000001:EDX",
];

/// Names of the bits, as Linux's /proc/cpuinfo spells most of them.
fn bit_name(word: usize, bit: u32) -> Option<&'static str> {
    const L1_ECX: [&str; 32] = [
        "sse3",
        "pclmulqdq",
        "dtes64",
        "monitor",
        "ds_cpl",
        "vmx",
        "smx",
        "est",
        "tm2",
        "ssse3",
        "cid",
        "sdbg",
        "fma",
        "cx16",
        "xtpr",
        "pdcm",
        "",
        "pcid",
        "dca",
        "sse4_1",
        "sse4_2",
        "x2apic",
        "movbe",
        "popcnt",
        "tsc_deadline",
        "aes",
        "xsave",
        "osxsave",
        "avx",
        "f16c",
        "rdrand",
        "hypervisor",
    ];
    const L1_EDX: [&str; 32] = [
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "", "sep", "mtrr", "pge", "mca", "cmov",
        "pat", "pse36", "pn", "clflush", "", "dts", "acpi", "mmx", "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64",
        "pbe",
    ];
    const L7_EBX: [&str; 32] = [
        "fsgsbase",
        "tsc_adjust",
        "sgx",
        "bmi1",
        "hle",
        "avx2",
        "",
        "smep",
        "bmi2",
        "erms",
        "invpcid",
        "rtm",
        "pqm",
        "",
        "mpx",
        "rdt_a",
        "avx512f",
        "avx512dq",
        "rdseed",
        "adx",
        "smap",
        "avx512ifma",
        "",
        "clflushopt",
        "clwb",
        "intel_pt",
        "avx512pf",
        "avx512er",
        "avx512cd",
        "sha_ni",
        "avx512bw",
        "avx512vl",
    ];
    const L7_ECX: [&str; 32] = [
        "prefetchwt1",
        "avx512vbmi",
        "umip",
        "pku",
        "ospke",
        "waitpkg",
        "avx512_vbmi2",
        "cet_ss",
        "gfni",
        "vaes",
        "vpclmulqdq",
        "avx512_vnni",
        "avx512_bitalg",
        "tme",
        "avx512_vpopcntdq",
        "",
        "la57",
        "",
        "",
        "",
        "",
        "",
        "rdpid",
        "",
        "bus_lock_detect",
        "cldemote",
        "",
        "movdiri",
        "movdir64b",
        "enqcmd",
        "sgx_lc",
        "pks",
    ];
    const L7_EDX: [&str; 32] = [
        "",
        "",
        "avx512_4vnniw",
        "avx512_4fmaps",
        "fsrm",
        "",
        "",
        "",
        "avx512_vp2intersect",
        "srbds_ctrl",
        "md_clear",
        "rtm_always_abort",
        "",
        "tsx_force_abort",
        "serialize",
        "hybrid_cpu",
        "tsxldtrk",
        "",
        "pconfig",
        "arch_lbr",
        "ibt",
        "",
        "amx_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_int8",
        "spec_ctrl",
        "intel_stibp",
        "flush_l1d",
        "arch_capabilities",
        "core_capabilities",
        "spec_ctrl_ssbd",
    ];
    const E1_ECX: [&str; 32] = [
        "lahf_lm",
        "cmp_legacy",
        "svm",
        "extapic",
        "cr8_legacy",
        "abm",
        "sse4a",
        "misalignsse",
        "3dnowprefetch",
        "osvw",
        "ibs",
        "xop",
        "skinit",
        "wdt",
        "",
        "lwp",
        "fma4",
        "tce",
        "",
        "nodeid_msr",
        "",
        "tbm",
        "topoext",
        "perfctr_core",
        "perfctr_nb",
        "",
        "bpext",
        "ptsc",
        "perfctr_llc",
        "mwaitx",
        "",
        "",
    ];
    const E1_EDX: [&str; 32] = [
        "", "", "", "", "", "", "", "", "", "", "", "syscall", "", "", "", "", "", "", "", "mp", "nx", "", "mmxext",
        "", "", "fxsr_opt", "pdpe1gb", "rdtscp", "", "lm", "3dnowext", "3dnow",
    ];
    let table = [L1_ECX, L1_EDX, L7_EBX, L7_ECX, L7_EDX, E1_ECX, E1_EDX].get(word)?;
    table.get(bit as usize).copied().filter(|n| !n.is_empty())
}

impl CpuFeatures {
    /// From a CPUID function `cpuid(leaf, subleaf) -> [eax, ebx, ecx, edx]`.
    pub fn from_cpuid(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Self {
        let max = cpuid(0, 0)[0];
        let max_ext = cpuid(0x8000_0000, 0)[0];
        let l1 = cpuid(1, 0);
        let l7 = if max >= 7 { cpuid(7, 0) } else { [0; 4] };
        let e1 = if max_ext >= 0x8000_0001 {
            cpuid(0x8000_0001, 0)
        } else {
            [0; 4]
        };
        CpuFeatures {
            leaf1_ecx: l1[2],
            leaf1_edx: l1[3],
            leaf7_ebx: l7[1],
            leaf7_ecx: l7[2],
            leaf7_edx: l7[3],
            ext1_ecx: e1[2],
            ext1_edx: e1[3],
        }
    }

    /// What the emu engine offers the vCPUs of a machine of `cpus`.
    pub fn emu(cpus: u32) -> Self {
        let config = x86emu::CpuConfig {
            apic_id: 0,
            cpu_count: cpus.max(1),
            tsc_khz: crate::machine::TSC_KHZ,
            ..x86emu::CpuConfig::default()
        };
        Self::from_cpuid(|leaf, sub| config.cpuid(leaf, sub))
    }

    /// The features both offer: what a machine that must be able to move
    /// between the two may show its guest.
    pub fn intersection(&self, other: &CpuFeatures) -> CpuFeatures {
        CpuFeatures {
            leaf1_ecx: self.leaf1_ecx & other.leaf1_ecx,
            leaf1_edx: self.leaf1_edx & other.leaf1_edx,
            leaf7_ebx: self.leaf7_ebx & other.leaf7_ebx,
            leaf7_ecx: self.leaf7_ecx & other.leaf7_ecx,
            leaf7_edx: self.leaf7_edx & other.leaf7_edx,
            ext1_ecx: self.ext1_ecx & other.ext1_ecx,
            ext1_edx: self.ext1_edx & other.ext1_edx,
        }
    }

    pub fn words(&self) -> [u32; 7] {
        [
            self.leaf1_ecx,
            self.leaf1_edx,
            self.leaf7_ebx,
            self.leaf7_ecx,
            self.leaf7_edx,
            self.ext1_ecx,
            self.ext1_edx,
        ]
    }

    /// The features of `self` that `offered` lacks, by name (empty when
    /// `offered` has them all).
    pub fn missing_from(&self, offered: &CpuFeatures) -> Vec<String> {
        let mut out = Vec::new();
        for (w, ((&saw, &has), ignored)) in self.words().iter().zip(offered.words().iter()).zip(IGNORED).enumerate() {
            let missing = saw & !has & !ignored;
            for bit in (0..32).filter(|b| missing & (1 << b) != 0) {
                out.push(match bit_name(w, bit) {
                    Some(n) => n.to_string(),
                    None => format!("{}[{bit}]", WORD_NAMES[w]),
                });
            }
        }
        out
    }

    /// Every compared feature, by name.
    pub fn names(&self) -> Vec<String> {
        self.missing_from(&CpuFeatures::default())
    }

    /// Clear in a CPUID answer for `leaf`/`subleaf` the compared features
    /// that `self` lacks, so that a guest restored from a snapshot keeps
    /// seeing no more than it saw (bits left out of the comparison stay).
    pub fn mask(&self, leaf: u32, subleaf: u32, regs: &mut [u32; 4]) {
        let w = self.words();
        let keep = |i: usize| w[i] | IGNORED[i];
        match (leaf, subleaf) {
            (1, _) => {
                regs[2] &= keep(0);
                regs[3] &= keep(1);
            }
            (7, 0) => {
                regs[1] &= keep(2);
                regs[2] &= keep(3);
                regs[3] &= keep(4);
            }
            (0x8000_0001, _) => {
                regs[2] &= keep(5);
                regs[3] &= keep(6);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emu_offers_what_it_offers_and_names_what_it_lacks() {
        let emu = CpuFeatures::emu(2);
        assert!(emu.missing_from(&emu).is_empty());
        assert!(emu.leaf1_edx & (1 << 26) != 0, "sse2");
        let mut avx = emu;
        avx.leaf1_ecx |= (1 << 28) | (1 << 20);
        avx.leaf7_ebx |= 1 << 5;
        avx.leaf7_edx |= 1 << 1;
        assert_eq!(
            avx.missing_from(&emu),
            ["sse4_2", "avx", "avx2", "CPUID.7.0:EDX[1]"].map(String::from)
        );
        // Bits that are not features do not count.
        let mut os = emu;
        os.leaf1_ecx |= 1 << 27;
        os.leaf1_edx |= 1 << 28;
        os.ext1_edx |= 1;
        assert!(os.missing_from(&CpuFeatures::default()).len() == emu.missing_from(&CpuFeatures::default()).len());
    }

    #[test]
    fn masking_takes_away_what_the_guest_did_not_see() {
        let saw = CpuFeatures::emu(1);
        let mut regs = [0, 0, u32::MAX, u32::MAX];
        saw.mask(1, 0, &mut regs);
        assert_eq!(regs[2], saw.leaf1_ecx | IGNORED[0]);
        assert_eq!(regs[3], saw.leaf1_edx | IGNORED[1]);
        let mut l7 = [0, u32::MAX, u32::MAX, u32::MAX];
        saw.mask(7, 0, &mut l7);
        let after = CpuFeatures {
            leaf7_ebx: l7[1],
            leaf7_ecx: l7[2],
            leaf7_edx: l7[3],
            ..saw
        };
        assert!(after.missing_from(&saw).is_empty());
        let mut other = [1, 2, 3, 4];
        saw.mask(0xd, 0, &mut other);
        assert_eq!(other, [1, 2, 3, 4]);
    }
}
