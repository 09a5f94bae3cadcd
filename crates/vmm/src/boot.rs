//! Linux boot: load the kernel (ELF vmlinux or bzImage) and the initrd
//! with linux-loader, write the zero page (boot_params with e820), the
//! command line, an identity-mapped page table and a GDT, and build the
//! 64-bit entry state the Linux boot protocol expects.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86emu::state::{CpuState, Segment};

use crate::memory::{ram_ranges, MMIO_HOLE_START};
use crate::{Error, Result};

/// Fixed low-memory layout (as Firecracker's).
pub const GDT_ADDR: u64 = 0x500;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
/// Four page directories identity-map the first 4 GiB with 2 MiB pages.
pub const PD: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Where the kernel is loaded (the default physical start of x86-64 Linux).
pub const KERNEL_START: u64 = 0x100_0000;
/// Kernels may not be loaded below 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Firmware-ish area below 1 MiB that the e820 map reserves.
const EBDA_START: u64 = 0x9fc00;
/// The x86 reset vector, F000:FFF0.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// What sits at the reset vector. There is no BIOS, but Linux on
/// hardware-reduced ACPI without EFI reboots (after trying EFI) by jumping
/// there in real mode (`machine_real_restart`). So pulse the reset line
/// through the i8042, which ends the run as `reboot=k` does:
/// `mov al, 0xfe; out 0x64, al; cli; hlt; jmp $-1`.
const RESET_STUB: [u8; 8] = [0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4, 0xeb, 0xfd];

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What the boot loader needs.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    /// Where the ACPI RSDP is, for `boot_params.acpi_rsdp_addr` (Linux
    /// also finds it by scanning the BIOS area).
    pub acpi_rsdp: Option<u64>,
}

fn kernel_err(p: &Path, reason: impl ToString) -> Error {
    Error::Kernel {
        path: p.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Load everything and return the boot CPU's initial state.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<CpuState> {
    let mut file = File::open(spec.kernel).map_err(|e| kernel_err(spec.kernel, e))?;
    let (entry, mut params) = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => (r.kernel_load.0, boot_params::default()),
        Err(elf_err) => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|bz| {
                kernel_err(
                    spec.kernel,
                    format!("neither an ELF vmlinux ({elf_err}) nor a bzImage ({bz})"),
                )
            })?;
            let hdr = r
                .setup_header
                .ok_or_else(|| kernel_err(spec.kernel, "bzImage without a setup header"))?;
            // 64-bit entry needs boot protocol 2.06+ with XLF_KERNEL_64.
            if hdr.version < 0x206 || hdr.xloadflags & 1 == 0 {
                return Err(kernel_err(
                    spec.kernel,
                    "bzImage has no 64-bit entry point (boot protocol < 2.06)",
                ));
            }
            let p = boot_params {
                hdr,
                ..Default::default()
            };
            (r.kernel_load.0 + 0x200, p)
        }
    };

    // Command line.
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(spec.cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(|e| Error::Cmdline(e.to_string()))?;

    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = spec.cmdline.len() as u32 + 1;
    params.hdr.loadflags |= 1; // LOADED_HIGH
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x100_0000;
    }

    // Initrd: as high as allowed, below the MMIO hole and initrd_addr_max.
    if let Some(path) = spec.initrd {
        let data = std::fs::read(path).map_err(|e| Error::Initrd {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let low_ram_end = spec.mem_size.min(MMIO_HOLE_START);
        let max = if params.hdr.initrd_addr_max != 0 {
            (params.hdr.initrd_addr_max as u64 + 1).min(low_ram_end)
        } else {
            low_ram_end.min(0x3800_0000)
        };
        let kernel_end = KERNEL_START + 64 * (1 << 20);
        let size = data.len() as u64;
        let addr = max
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end)
            .ok_or_else(|| Error::Initrd {
                path: path.display().to_string(),
                reason: format!(
                    "{} MiB does not fit in guest memory of {} MiB",
                    size >> 20,
                    spec.mem_size >> 20
                ),
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // e820: low RAM, the reserved EBDA/BIOS area, then RAM above 1 MiB.
    let mut e820 = vec![
        (0u64, EBDA_START, E820_RAM),
        (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(spec.mem_size) {
        let s = start.max(0x10_0000);
        let end = start + len;
        if end > s {
            e820.push((s, end - s, E820_RAM));
        }
    }
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    if let Some(rsdp) = spec.acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| Error::Memory(e.to_string()))?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(|e| Error::Memory(e.to_string()))?;

    let mut s = CpuState::long_mode_flat(PML4);
    s.rip = entry;
    s.gpr[x86emu::state::reg::RSI] = ZERO_PAGE;
    s.gpr[x86emu::state::reg::RSP] = BOOT_STACK;
    s.gpr[x86emu::state::reg::RBP] = BOOT_STACK;
    s.gdtr.base = GDT_ADDR;
    s.gdtr.limit = (GDT.len() * 8 - 1) as u16;
    s.segs[1] = Segment::from_descriptor(0x08, GDT[1]);
    let data = Segment::from_descriptor(0x10, GDT[2]);
    s.segs[0] = data;
    s.segs[2] = data;
    s.segs[3] = data;
    s.segs[4] = data;
    s.segs[5] = data;
    s.tr = Segment::from_descriptor(0x18, GDT[3]);
    // Linux expects interrupts off and a clean RFLAGS.
    s.rflags = x86emu::state::flags::FIXED1;
    Ok(s)
}

/// Null, 64-bit code (0x08), data (0x10), a TSS (0x18).
const GDT: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0080_8b00_0000_0067];

fn write_gdt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(|e| Error::Memory(e.to_string()))?;
    }
    Ok(())
}

/// Identity-map the first 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| Error::Memory(e.to_string()))
    };
    w(PDPT | 3, PML4)?;
    for i in 0..4u64 {
        w((PD + i * 0x1000) | 3, PDPT + i * 8)?;
        for j in 0..512u64 {
            let phys = (i << 30) | (j << 21);
            w(phys | 0x83, PD + i * 0x1000 + j * 8)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_kernel() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("vessel-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("garbage");
        std::fs::write(&k, vec![0x5a; 8192]).unwrap();
        let err = load(
            &mem,
            &BootSpec {
                kernel: &k,
                initrd: None,
                cmdline: "console=ttyS0",
                mem_size: 64 << 20,
                acpi_rsdp: None,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("neither an ELF"), "{err}");
        let missing = load(
            &mem,
            &BootSpec {
                kernel: &dir.join("missing"),
                initrd: None,
                cmdline: "",
                mem_size: 64 << 20,
                acpi_rsdp: None,
            },
        );
        assert!(missing.is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = crate::memory::create(64 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD + 0x1000 * 3 + 511 * 8)).unwrap();
        assert_eq!(pde, 0xffe0_0000 | 0x83);
    }
}
