//! ACPI tables, for guests that find their devices through ACPI (Debian's
//! stock kernel lacks `virtio_mmio.device=` support and needs `LNRO0005`
//! nodes, as under Firecracker).
//!
//! A hardware-reduced ACPI 6.5 platform, like Firecracker's and Cloud
//! Hypervisor's:
//! - RSDP (revision 2) at [`ACPI_START`], 16-byte aligned in the BIOS area
//!   that Linux scans (0xe0000-0xfffff, reserved in the e820 map), and also
//!   passed in `boot_params.acpi_rsdp_addr`;
//! - XSDT pointing at the FADT and the MADT;
//! - FADT: the hardware-reduced flag (no PM timer, no SCI, no PIT or legacy
//!   PIC setup by the kernel: the LAPIC TSC-deadline timer and the TSC
//!   frequency from CPUID serve instead), the sleep control/status register
//!   pair and the reset register of [`crate::devices::acpi_pm`];
//! - MADT: one local APIC per CPU (ids 0..N-1), the IOAPIC (id N, GSI base
//!   0), the ISA IRQ0 → GSI 2 interrupt source override and the NMI on LINT1,
//!   which is what the MP table ([`crate::devices::mptable`]) says too;
//! - DSDT: COM1 (`PNP0501`, ports 0x3f8-0x3ff, IRQ 4), the RTC (`PNP0B00`,
//!   ports 0x70-0x71, IRQ 8), one `LNRO0005` device per virtio-mmio slot,
//!   the VM generation ID (`VGEN`, Microsoft's VMGenID: 16 bytes at
//!   [`VMGENID_ADDR`]) with the Generic Event Device (`ACPI0013`, GSI
//!   [`VMGENID_GSI`]) that tells the guest when it changes, and `_S5` so
//!   that the guest can power off.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::devices::acpi_pm::{RESET_PORT, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use crate::devices::ioapic::{IOAPIC_BASE, NUM_PINS};
use crate::devices::lapic::LAPIC_BASE;
use crate::devices::mptable::{self, MAX_CPUS};
use crate::devices::serial::{COM1_BASE, COM1_IRQ};
use crate::memory::{MMIO_HOLE_END, MMIO_HOLE_START};
use crate::{Error, Result};

/// Where the tables go: the start of the BIOS area, where Linux looks for
/// the RSDP when it is not told where it is.
pub const ACPI_START: u64 = 0xe_0000;
/// The tables end before the reset vector's code (the BIOS area, up to
/// 1 MiB, is reserved in the e820 map).
pub const ACPI_END: u64 = crate::boot::RESET_VECTOR;
/// At most this many virtio-mmio slots: they use IOAPIC pins 16-23.
pub const MAX_VIRTIO_SLOTS: usize = NUM_PINS - 16;

/// The CMOS RTC's index/data ports and ISA IRQ.
const RTC_PORT: u16 = 0x70;
const RTC_IRQ: u32 = 8;

/// Where the 16-byte VM generation ID lives: in the BIOS area, reserved in
/// the e820 map, after the tables.
pub const VMGENID_ADDR: u64 = 0xf_e000;
/// The Generic Event Device's interrupt: an ISA IRQ nothing else uses
/// (edge-triggered, active high).
pub const VMGENID_GSI: u32 = 5;
/// The notification value ACPI gives for "the generation ID changed".
const VMGENID_NOTIFY: u8 = 0x80;

const OEM_ID: [u8; 6] = *b"VESSEL";
const OEM_REVISION: u32 = 1;

/// One virtio-mmio device as the guest should see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Guest-physical base of its register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its IOAPIC pin (edge-triggered, active high).
    pub gsi: u32,
}

/// The tables as they are laid out from [`ACPI_START`].
pub struct Tables {
    /// Everything, to be written at [`ACPI_START`].
    pub bytes: Vec<u8>,
    /// Guest-physical address of the RSDP.
    pub rsdp: u64,
}

/// MADT Interrupt Source Override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: [u8; 4],
    flags: [u8; 2],
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT Local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: [u8; 2],
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT flag: the machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// FADT IA-PC boot architecture flags: no VGA, no MSI (and no i8042 for
/// the kernel to probe: ours only resets the machine, as Firecracker's).
const IAPC_BOOT_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_MSI_NOT_PRESENT: u16 = 1 << 3;
/// The offset of `iapc_boot_arch` in the FADT.
const FADT_IAPC_BOOT_ARCH: usize = 109;

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Fix an SDT's checksum (byte 9) after editing it.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

fn check_slots(virtio: &[VirtioSlot]) -> Result<()> {
    if virtio.len() > MAX_VIRTIO_SLOTS {
        return Err(Error::Config(format!(
            "at most {MAX_VIRTIO_SLOTS} virtio-mmio devices, not {}",
            virtio.len()
        )));
    }
    for s in virtio {
        let end = s.base.checked_add(s.size);
        if s.size == 0 || s.base < MMIO_HOLE_START || end.is_none_or(|e| e > MMIO_HOLE_END) {
            return Err(Error::Config(format!(
                "virtio-mmio window {:#x}+{:#x} is not inside the MMIO hole",
                s.base, s.size
            )));
        }
        if !(16..NUM_PINS as u32).contains(&s.gsi) {
            return Err(Error::Config(format!(
                "virtio-mmio interrupt {} is not an IOAPIC pin from 16 to {}",
                s.gsi,
                NUM_PINS - 1
            )));
        }
    }
    Ok(())
}

/// The DSDT's AML: COM1, the virtio-mmio devices, and `_S5`.
fn dsdt(virtio: &[VirtioSlot]) -> Vec<u8> {
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_io = aml::IO::new(COM1_BASE, COM1_BASE, 1, 8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_irq, &com1_io]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_names = [
        aml::Name::new("_HID".into(), &com1_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_DDN".into(), &"COM1"),
        aml::Name::new("_CRS".into(), &com1_crs),
    ];
    let com1 = aml::Device::new("COM1".into(), com1_names.iter().map(|n| n as &dyn Aml).collect());

    // The CMOS RTC: without it, a hardware-reduced kernel's rtc_cmos finds
    // no usable interrupt for its legacy platform device.
    let rtc_io = aml::IO::new(RTC_PORT, RTC_PORT, 1, 2);
    let rtc_irq = aml::Interrupt::new(true, true, false, false, RTC_IRQ);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let rtc_hid = aml::EISAName::new("PNP0B00");
    let rtc_names = [
        aml::Name::new("_HID".into(), &rtc_hid),
        aml::Name::new("_CRS".into(), &rtc_crs),
    ];
    let rtc = aml::Device::new("RTC_".into(), rtc_names.iter().map(|n| n as &dyn Aml).collect());

    // Each virtio device: its name, _HID, _UID, _CCA and _CRS, as Firecracker.
    let mut virtio_devices: Vec<Vec<u8>> = Vec::new();
    for (i, s) in virtio.iter().enumerate() {
        // check_slots keeps base and size below 4 GiB.
        let mem = aml::Memory32Fixed::new(true, s.base as u32, s.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, s.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let uid = i as u32;
        let names = [
            aml::Name::new("_HID".into(), &"LNRO0005"),
            aml::Name::new("_UID".into(), &uid),
            aml::Name::new("_CCA".into(), &aml::ONE),
            aml::Name::new("_CRS".into(), &crs),
        ];
        let path = format!("V{i:03X}");
        let dev = aml::Device::new(path.as_str().into(), names.iter().map(|n| n as &dyn Aml).collect());
        virtio_devices.push(to_bytes(&dev));
    }
    // VMGenID: ADDR returns the ID's address as two 32-bit halves.
    let (addr_lo, addr_hi) = (VMGENID_ADDR as u32, (VMGENID_ADDR >> 32) as u32);
    let addr_pkg = aml::Package::new(vec![&addr_lo, &addr_hi]);
    let addr_ret = aml::Return::new(&addr_pkg);
    let addr = aml::Method::new("ADDR".into(), 0, false, vec![&addr_ret]);
    let vgen_names = [
        // Linux and Windows match the _CID; the _HID is ours.
        aml::Name::new("_HID".into(), &"VSSL0001"),
        aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
        aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
    ];
    let mut vgen_children: Vec<&dyn Aml> = vgen_names.iter().map(|n| n as &dyn Aml).collect();
    vgen_children.push(&addr);
    let vgen = aml::Device::new("VGEN".into(), vgen_children);
    // The Generic Event Device: its interrupt runs _EVT with the GSI,
    // which notifies VGEN.
    let ged_irq = aml::Interrupt::new(true, true, false, false, VMGENID_GSI);
    let ged_crs = aml::ResourceTemplate::new(vec![&ged_irq]);
    let vgen_path = aml::Path::new("\\_SB_.VGEN");
    let notify_value = VMGENID_NOTIFY;
    let notify = aml::Notify::new(&vgen_path, &notify_value);
    let gsi = VMGENID_GSI;
    let is_vgen = aml::Equal::new(&aml::Arg(0), &gsi);
    let on_vgen = aml::If::new(&is_vgen, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&on_vgen]);
    let ged_hid = "ACPI0013";
    let ged_names = [
        aml::Name::new("_HID".into(), &ged_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &ged_crs),
    ];
    let mut ged_children: Vec<&dyn Aml> = ged_names.iter().map(|n| n as &dyn Aml).collect();
    ged_children.push(&evt);
    let ged = aml::Device::new("GED_".into(), ged_children);

    let virtio_raw: Vec<RawAml> = virtio_devices.into_iter().map(RawAml).collect();
    let mut sb_children: Vec<&dyn Aml> = vec![&com1, &rtc, &vgen, &ged];
    sb_children.extend(virtio_raw.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new("\\_SB_".into(), sb_children);
    let s5_type = S5_SLEEP_TYPE;
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_type]));
    let mut out = to_bytes(&sb);
    s5.to_aml_bytes(&mut out);
    out
}

/// Already-encoded AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"VESSELMA",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_BASE as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The IOAPIC's id follows the CPUs', as in the MP table.
    madt.add_structure(IoApic::new(cpus, IOAPIC_BASE as u32, 0));
    // ISA IRQs on pins of another number: only IRQ0, on pin 2. Flags 0:
    // polarity and trigger conform to the bus (ISA: edge, active high).
    for irq in 0..16u8 {
        if let Some(pin) = mptable::isa_irq_to_pin(irq).filter(|&p| p != irq) {
            madt.add_structure(InterruptSourceOverride {
                r#type: 2,
                length: 10,
                bus: 0,
                source: irq,
                gsi: u32::from(pin).to_le_bytes(),
                flags: [0; 2],
            });
        }
    }
    // NMI on LINT1 of every processor (uid 0xff: all).
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xff,
        flags: [0; 2],
        lint: 1,
    });
    let mut bytes = to_bytes(&madt);
    // The crate leaves the MADT flags at 0; we have 8259s, so PCAT_COMPAT.
    bytes[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io8 = |port: u16| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port));
    let mut b = FADTBuilder::new(OEM_ID, *b"VESSELFA", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.reset_reg = io8(RESET_PORT);
    b.reset_value = RESET_VALUE;
    b.sleep_control_reg = io8(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io8(SLEEP_STATUS_PORT);
    let mut bytes = to_bytes(&b.finalize());
    let flags = IAPC_BOOT_VGA_NOT_PRESENT | IAPC_BOOT_MSI_NOT_PRESENT;
    bytes[FADT_IAPC_BOOT_ARCH..FADT_IAPC_BOOT_ARCH + 2].copy_from_slice(&flags.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

fn align16(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(16), 0);
}

/// Lay out all tables from [`ACPI_START`].
pub fn build(cpus: u8, virtio: &[VirtioSlot]) -> Result<Tables> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::Config(format!(
            "ACPI tables support 1 to {MAX_CPUS} CPUs, not {cpus}"
        )));
    }
    check_slots(virtio)?;
    let base = ACPI_START;
    let at = |v: &Vec<u8>| base + v.len() as u64;

    let mut out = Vec::new();
    // The RSDP goes first, at a 16-byte boundary; it points at the XSDT.
    let rsdp_addr = at(&out);
    out.resize(Rsdp::len(), 0);
    align16(&mut out);

    let mut dsdt_sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VESSELDS", OEM_REVISION);
    dsdt_sdt.append_slice(&dsdt(virtio));
    let dsdt_addr = at(&out);
    out.extend_from_slice(dsdt_sdt.as_slice());
    align16(&mut out);

    let fadt_addr = at(&out);
    out.extend_from_slice(&fadt(dsdt_addr));
    align16(&mut out);

    let madt_addr = at(&out);
    out.extend_from_slice(&madt(cpus));
    align16(&mut out);

    let mut xsdt = XSDT::new(OEM_ID, *b"VESSELXS", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = at(&out);
    out.extend_from_slice(&to_bytes(&xsdt));

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    out[..rsdp.len()].copy_from_slice(&rsdp);

    if base + out.len() as u64 > VMGENID_ADDR {
        return Err(Error::Config(format!(
            "ACPI tables of {} bytes do not fit in the BIOS area",
            out.len()
        )));
    }
    Ok(Tables {
        bytes: out,
        rsdp: rsdp_addr,
    })
}

/// Write the ACPI tables into guest memory; returns the RSDP's address.
pub fn setup_acpi(mem: &GuestMemoryMmap, cpus: u8, virtio: &[VirtioSlot]) -> Result<GuestAddress> {
    let t = build(cpus, virtio)?;
    mem.write_slice(&t.bytes, GuestAddress(ACPI_START))
        .map_err(|e| Error::Memory(format!("cannot write the ACPI tables: {e}")))?;
    new_generation_id(mem)?;
    Ok(GuestAddress(t.rsdp))
}

/// Give the VM a new, random generation ID (at boot, and on every restore
/// of a snapshot, so that clones differ). The caller then raises
/// [`VMGENID_GSI`] once the guest may run, so that the guest reads it and
/// reseeds its random generator.
pub fn new_generation_id(mem: &GuestMemoryMmap) -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into `id`, which is 16 long.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        return Err(Error::Memory(format!(
            "no randomness for the VM generation ID: {}",
            std::io::Error::last_os_error()
        )));
    }
    mem.write_slice(&id, GuestAddress(VMGENID_ADDR))
        .map_err(|e| Error::Memory(format!("cannot write the VM generation ID: {e}")))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn slots(n: usize) -> Vec<VirtioSlot> {
        (0..n)
            .map(|i| VirtioSlot {
                base: 0xd000_0000 + i as u64 * 0x1000,
                size: 0x1000,
                gsi: 16 + i as u32,
            })
            .collect()
    }

    /// The tables found by following the RSDP, as Linux does: (signature, bytes).
    fn walk(t: &Tables) -> Vec<([u8; 4], Vec<u8>)> {
        let at = |addr: u64| &t.bytes[(addr - ACPI_START) as usize..];
        let table = |addr: u64| {
            let b = at(addr);
            let len = u32_at(b, 4) as usize;
            let tb = b[..len].to_vec();
            assert_eq!(sum(&tb), 0, "checksum of {:?}", std::str::from_utf8(&tb[..4]));
            (tb[..4].try_into().unwrap(), tb)
        };
        let rsdp = &at(t.rsdp)[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(u32_at(rsdp, 20), 36);
        let (sig, xsdt) = table(u64_at(rsdp, 24));
        assert_eq!(&sig, b"XSDT");
        let mut out = vec![(sig, xsdt.clone())];
        for i in (36..xsdt.len()).step_by(8) {
            let entry = table(u64_at(&xsdt, i));
            if &entry.0 == b"FACP" {
                out.push(table(u64_at(&entry.1, 140)));
            }
            out.push(entry);
        }
        out
    }

    fn find(tables: &[([u8; 4], Vec<u8>)], sig: &[u8; 4]) -> Vec<u8> {
        tables.iter().find(|t| &t.0 == sig).unwrap().1.clone()
    }

    #[test]
    fn rsdp_where_linux_scans() {
        let t = build(2, &slots(2)).unwrap();
        assert_eq!(t.rsdp % 16, 0);
        assert!((0xe_0000..0x10_0000).contains(&t.rsdp));
        assert!(ACPI_START + t.bytes.len() as u64 <= ACPI_END);
        // The MP table (at most its 254-CPU size from 0x9fc00) stays below.
        let mp = crate::devices::mptable::build(MAX_CPUS, mptable::MPTABLE_START).unwrap();
        assert!(mptable::MPTABLE_START + mp.len() as u64 <= ACPI_START);
    }

    #[test]
    fn tables_and_checksums() {
        for (cpus, n) in [(1u8, 0usize), (2, 1), (4, 8), (MAX_CPUS, 8)] {
            let t = build(cpus, &slots(n)).unwrap();
            let tables = walk(&t);
            let sigs: Vec<_> = tables.iter().map(|t| t.0).collect();
            assert_eq!(sigs, [*b"XSDT", *b"DSDT", *b"FACP", *b"APIC"]);

            let fadt = find(&tables, b"FACP");
            assert_eq!(fadt.len(), 276, "ACPI 6 FADT");
            assert_eq!(fadt[8], 6);
            let flags = u32_at(&fadt, 112);
            assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
            assert_ne!(flags & (1 << 10), 0, "reset register supported");
            // Reset register (GAS at 116) and value (128).
            assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
            assert_eq!(u64_at(&fadt, 120), u64::from(RESET_PORT));
            assert_eq!(fadt[128], RESET_VALUE);
            // Sleep control (244) and status (256) registers.
            assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
            assert_eq!(u64_at(&fadt, 248), u64::from(SLEEP_CONTROL_PORT));
            assert_eq!(u64_at(&fadt, 260), u64::from(SLEEP_STATUS_PORT));
            assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0b1100);

            let madt = find(&tables, b"APIC");
            assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
            assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
            let mut off = 44;
            let (mut lapics, mut ioapics, mut isos, mut nmis) = (0u32, 0, 0, 0);
            while off < madt.len() {
                let (ty, len) = (madt[off], madt[off + 1] as usize);
                let e = &madt[off..off + len];
                match ty {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!((e[2], e[3]), (lapics as u8, lapics as u8));
                        assert_eq!(u32_at(e, 4), 1);
                        lapics += 1;
                    }
                    1 => {
                        assert_eq!(len, 12);
                        assert_eq!(e[2], cpus, "IOAPIC id follows the CPUs (as in the MP table)");
                        assert_eq!(u32_at(e, 4), 0xfec0_0000);
                        assert_eq!(u32_at(e, 8), 0);
                        ioapics += 1;
                    }
                    2 => {
                        assert_eq!(len, 10);
                        // bus ISA, IRQ0 -> GSI 2, conforming (edge, high).
                        assert_eq!((e[2], e[3], u32_at(e, 4), e[8], e[9]), (0, 0, 2, 0, 0));
                        isos += 1;
                    }
                    4 => {
                        assert_eq!(e, &[4, 6, 0xff, 0, 0, 1]);
                        nmis += 1;
                    }
                    other => panic!("unexpected MADT entry {other}"),
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            assert_eq!((lapics, ioapics, isos, nmis), (u32::from(cpus), 1, 1, 1));

            let dsdt = find(&tables, b"DSDT");
            let count = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
            assert_eq!(count(b"LNRO0005\0"), n);
            assert_eq!(count(b"COM1"), 2, "the device and its _DDN");
            assert_eq!(count(b"_S5_"), 1);
            for i in 0..n {
                assert_eq!(count(format!("V{i:03X}").as_bytes()), 1);
                // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
                let mut m = vec![0x86, 9, 0, 1];
                m.extend_from_slice(&(0xd000_0000u32 + i as u32 * 0x1000).to_le_bytes());
                m.extend_from_slice(&0x1000u32.to_le_bytes());
                assert_eq!(count(&m), 1);
                // Extended interrupt: consumer, edge, active high, exclusive.
                let mut irq = vec![0x89, 6, 0, 0b0011, 1];
                irq.extend_from_slice(&(16 + i as u32).to_le_bytes());
                assert_eq!(count(&irq), 1);
            }
        }
    }

    #[test]
    fn bad_configurations_are_errors() {
        assert!(build(0, &[]).is_err());
        assert!(build(MAX_CPUS + 1, &[]).is_err());
        assert!(build(1, &slots(9)).is_err());
        let bad = |s: VirtioSlot| build(1, &[s]).is_err();
        let ok = slots(1)[0];
        assert!(!bad(ok));
        assert!(bad(VirtioSlot { gsi: 15, ..ok }));
        assert!(bad(VirtioSlot { gsi: 24, ..ok }));
        assert!(bad(VirtioSlot { size: 0, ..ok }));
        assert!(bad(VirtioSlot { base: 0x1000, ..ok }));
        assert!(bad(VirtioSlot {
            base: u64::MAX - 10,
            ..ok
        }));
        assert!(bad(VirtioSlot {
            base: 0xffff_f000,
            size: 0x2000,
            ..ok
        }));
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = setup_acpi(&mem, 2, &slots(3)).unwrap();
        let t = build(2, &slots(3)).unwrap();
        assert_eq!(rsdp.0, t.rsdp);
        let mut back = vec![0u8; t.bytes.len()];
        mem.read_slice(&mut back, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(back, t.bytes);
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8000)]).unwrap();
        assert!(setup_acpi(&small, 1, &[]).is_err());
    }

    /// ACPICA's disassembler (Debian's acpica-tools; guest/build-all.sh
    /// installs it) parses every table without an error or a warning.
    #[test]
    fn iasl_disassembles_the_tables() {
        let iasl = std::process::Command::new("iasl").arg("-v").output();
        assert!(
            iasl.is_ok(),
            "iasl is missing: apt-get install acpica-tools (guest/build-all.sh does)"
        );
        let dir = std::env::temp_dir().join(format!("vessel-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = build(2, &slots(4)).unwrap();
        for (sig, bytes) in walk(&t) {
            let name = String::from_utf8_lossy(&sig).to_lowercase();
            let f = dir.join(format!("{name}.dat"));
            std::fs::write(&f, &bytes).unwrap();
            let o = std::process::Command::new("iasl").arg("-d").arg(&f).output().unwrap();
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(o.status.success(), "iasl -d {name}:\n{log}");
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            let lower = dsl.to_lowercase();
            assert!(
                !lower.contains("error") && !lower.contains("warning") && !lower.contains("invalid"),
                "{name}:\n{dsl}"
            );
            if name == "dsdt" {
                assert_eq!(dsl.matches("\"LNRO0005\"").count(), 4, "{dsl}");
                assert!(dsl.contains("EisaId (\"PNP0501\")"), "{dsl}");
                assert!(dsl.contains("EisaId (\"PNP0B00\")"), "{dsl}");
                assert!(dsl.contains("Name (_S5, Package"), "{dsl}");
                assert!(dsl.contains("Name (_CID, \"VM_Gen_Counter\")"), "{dsl}");
                assert!(dsl.contains("Notify (\\_SB.VGEN, 0x80)"), "{dsl}");
                assert!(dsl.contains("0x000FE000"), "{dsl}");
                assert!(dsl.contains("0xD0003000,         // Address Base"), "{dsl}");
                // Recompiling the disassembly must work too.
                let o = std::process::Command::new("iasl")
                    .arg("-p")
                    .arg(dir.join("recompiled"))
                    .arg(dir.join("dsdt.dsl"))
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
            }
        }
        // VESSEL_KEEP_ACPI=1 keeps the tables and their disassembly to look at.
        if std::env::var_os("VESSEL_KEEP_ACPI").is_none() {
            std::fs::remove_dir_all(&dir).ok();
        } else {
            eprintln!("tables and disassembly kept in {}", dir.display());
        }
    }
}
