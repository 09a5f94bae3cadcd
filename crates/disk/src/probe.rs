//! What QEMU would take a raw image's first sector for.
//!
//! QEMU opens an image without a given format by probing its first 512
//! bytes. A guest that writes an image header into sector 0 of its raw disk
//! can therefore turn the disk into, say, a qcow2 overlay of a host file on
//! the next probe (CVE-2008-2004). Vessel never probes (the format comes
//! from the user or the file name), but a raw image whose format was not
//! given keeps QEMU's guard anyway, so that the image stays safe for any
//! tool that does probe: a guest write that would make sector 0 look like
//! another format is refused (QEMU's `raw_co_pwritev` returns EPERM).

/// Bytes QEMU probes.
pub const PROBE_LEN: usize = 512;

/// The signatures of the formats QEMU probes by content (its `bdrv_probe`
/// functions), as (offset, magic, format name).
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (0, b"QFI\xfb", "qcow2"), // qcow2 and qcow share it
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0x40, &[0x7f, 0x10, 0xda, 0xbe], "vdi"), // 0xbeda107f, little-endian
];

/// The image format that a first sector starting with `sector` would be
/// probed as, or `None` if it would be taken for raw data.
pub fn looks_like_image(sector: &[u8]) -> Option<&'static str> {
    SIGNATURES
        .iter()
        .find(|(at, magic, _)| sector.get(*at..*at + magic.len()) == Some(*magic))
        .map(|(_, _, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_recognised_and_data_is_not() {
        let mut s = [0u8; PROBE_LEN];
        assert_eq!(looks_like_image(&s), None);
        s[..4].copy_from_slice(b"QFI\xfb");
        assert_eq!(looks_like_image(&s), Some("qcow2"));
        let mut s = [0u8; PROBE_LEN];
        s[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(looks_like_image(&s), Some("vdi"));
        // An MBR, an ext4 superblock area, text: raw.
        let mut mbr = [0u8; PROBE_LEN];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(looks_like_image(&mbr), None);
        assert_eq!(looks_like_image(b"QFI"), None);
        assert_eq!(looks_like_image(b"hello world"), None);
    }
}
