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
    // `kernel_end`: the end of the memory the kernel occupies before it
    // reads the e820 map (the initrd must lie above it).
    let (entry, mut params, kernel_end) = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => (r.kernel_load.0, boot_params::default(), r.kernel_end),
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
            let end = bzimage_end(r.kernel_load.0, &hdr).max(r.kernel_end);
            let p = boot_params {
                hdr,
                ..Default::default()
            };
            (r.kernel_load.0 + 0x200, p, end)
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
        let size = data.len() as u64;
        let addr =
            initrd_addr(size, spec.mem_size, params.hdr.initrd_addr_max, kernel_end).ok_or_else(|| Error::Initrd {
                path: path.display().to_string(),
                reason: format!(
                    "{size} bytes: it does not fit in guest memory of {} MiB between the kernel's \
                     end ({kernel_end:#x}) and {:#x}",
                    spec.mem_size >> 20,
                    initrd_limit(spec.mem_size, params.hdr.initrd_addr_max),
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

/// Where a bzImage's kernel ends up once it has decompressed itself: at
/// `pref_address` (or the load address rounded up to `kernel_alignment`,
/// if higher), taking `init_size` bytes from there before it reads the
/// memory map (Documentation/x86/boot.rst; arch/x86/boot/compressed/head_64.S).
fn bzimage_end(load: u64, hdr: &linux_loader::loader::bootparam::setup_header) -> u64 {
    let align = u64::from(hdr.kernel_alignment).max(1);
    let at = load.checked_next_multiple_of(align).unwrap_or(load);
    let start = if hdr.relocatable_kernel != 0 {
        at.max(hdr.pref_address)
    } else {
        hdr.pref_address.max(load)
    };
    start.saturating_add(u64::from(hdr.init_size))
}

/// The end of the area an initrd may occupy: the RAM below the MMIO hole,
/// and below the kernel's `initrd_addr_max` (0: the protocol's old default
/// of 0x37ffffff).
fn initrd_limit(mem_size: u64, initrd_addr_max: u32) -> u64 {
    let low_ram_end = mem_size.min(MMIO_HOLE_START);
    let max = match initrd_addr_max {
        0 => 0x3800_0000,
        m => u64::from(m) + 1,
    };
    low_ram_end.min(max)
}

/// Where to put an initrd of `size` bytes: the highest page-aligned
/// address below [`initrd_limit`] that clears the kernel (it ends at
/// `kernel_end`), as Firecracker and QEMU place it. `None`: it does not fit.
pub fn initrd_addr(size: u64, mem_size: u64, initrd_addr_max: u32, kernel_end: u64) -> Option<u64> {
    initrd_limit(mem_size, initrd_addr_max)
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIMEM_START))
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
    fn initrd_goes_high_and_clears_the_kernel() {
        const MIB: u64 = 1 << 20;
        // 64 MiB guest, 1 MiB initrd, a kernel ending at 28 MiB: the top page.
        let a = initrd_addr(MIB, 64 * MIB, 0x7fff_ffff, 28 * MIB).unwrap();
        assert_eq!(a, 63 * MIB);
        // Not page-sized: rounded down to a page, still below the top.
        let a = initrd_addr(MIB + 1, 64 * MIB, 0x7fff_ffff, 28 * MIB).unwrap();
        assert_eq!(a, 63 * MIB - 4096);
        // It must clear the kernel: 40 MiB does not fit above 28 MiB in 64.
        assert_eq!(initrd_addr(40 * MIB, 64 * MIB, 0x7fff_ffff, 28 * MIB), None);
        assert_eq!(initrd_addr(36 * MIB, 64 * MIB, 0x7fff_ffff, 28 * MIB), Some(28 * MIB));
        // initrd_addr_max and the MMIO hole bound it; 0 means 0x37ffffff.
        assert_eq!(initrd_addr(MIB, 8 << 30, 0x0fff_ffff, 28 * MIB), Some(255 * MIB));
        assert_eq!(initrd_addr(MIB, 8 << 30, 0, 28 * MIB), Some(0x3800_0000 - MIB));
        assert_eq!(
            initrd_addr(MIB, 8 << 30, u32::MAX, 28 * MIB),
            Some(MMIO_HOLE_START - MIB)
        );
        // Absurd sizes are refused, not wrapped.
        assert_eq!(initrd_addr(u64::MAX, 64 * MIB, 0, 0), None);
    }

    #[test]
    fn a_bzimage_ends_at_its_decompressed_size() {
        let mut hdr = linux_loader::loader::bootparam::setup_header {
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0xfd_1000,
            ..Default::default()
        };
        // Not relocatable: at pref_address, whatever the load address.
        assert_eq!(bzimage_end(0x10_0000, &hdr), 0x100_0000 + 0xfd_1000);
        // Relocatable, loaded high: at the load address, aligned up.
        hdr.relocatable_kernel = 1;
        assert_eq!(bzimage_end(0x10_0000, &hdr), 0x100_0000 + 0xfd_1000);
        assert_eq!(bzimage_end(0x210_0000, &hdr), 0x220_0000 + 0xfd_1000);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = crate::memory::create(64 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD + 0x1000 * 3 + 511 * 8)).unwrap();
        assert_eq!(pde, 0xffe0_0000 | 0x83);
    }
}
