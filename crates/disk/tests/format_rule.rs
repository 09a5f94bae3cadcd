//! Issue 14, hole 1: the format of an image never comes from bytes a guest
//! can write. A guest that plants a qcow2 header naming a host file as its
//! backing in sector 0 of its raw disk must not read that file later.

use std::path::Path;
use std::process::Command;

use disk::{BackingRules, BlockBackend, Error, ImageFormat, OpenOptions};

const SECRET: &[u8] = b"HOST-SECRET-0123456789";

/// A minimal qcow2 v2 image (64 KiB clusters, 1 MiB) whose backing file is
/// `backing`, with no backing format: header, L1 table, refcount table
/// and block, each one cluster; the four clusters have refcount 1.
fn qcow2_with_backing(backing: &str) -> Vec<u8> {
    let cs = 1usize << 16;
    let mut img = vec![0u8; 4 * cs];
    let mut put = |at: usize, b: &[u8]| img[at..at + b.len()].copy_from_slice(b);
    put(0, b"QFI\xfb");
    put(4, &2u32.to_be_bytes());
    put(8, &72u64.to_be_bytes());
    put(16, &(backing.len() as u32).to_be_bytes());
    put(20, &16u32.to_be_bytes());
    put(24, &(1u64 << 20).to_be_bytes());
    put(36, &1u32.to_be_bytes()); // L1 entries
    put(40, &(cs as u64).to_be_bytes()); // L1 at cluster 1
    put(48, &(2 * cs as u64).to_be_bytes()); // refcount table at cluster 2
    put(56, &1u32.to_be_bytes());
    put(72, backing.as_bytes());
    put(2 * cs, &(3 * cs as u64).to_be_bytes()); // refcount block at cluster 3
    for c in 0..4 {
        put(3 * cs + 2 * c, &1u16.to_be_bytes());
    }
    img
}

fn read_start(d: &dyn BlockBackend) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    d.read_at(&mut b, 0).unwrap();
    b
}

fn sees_secret(b: &[u8]) -> bool {
    b.windows(SECRET.len()).any(|w| w == SECRET)
}

#[test]
fn the_file_name_decides_the_format() {
    for (name, f) in [
        ("a.qcow2", ImageFormat::Qcow2),
        ("a.QCOW2", ImageFormat::Qcow2),
        ("dir.qcow2/a.img", ImageFormat::Raw),
        ("a.img", ImageFormat::Raw),
        ("a.raw", ImageFormat::Raw),
        ("a", ImageFormat::Raw),
        ("a.qcow2.bak", ImageFormat::Raw),
    ] {
        assert_eq!(ImageFormat::from_file_name(Path::new(name)), f, "{name}");
    }
    assert_eq!("raw".parse::<ImageFormat>().unwrap(), ImageFormat::Raw);
    assert_eq!("qcow2".parse::<ImageFormat>().unwrap(), ImageFormat::Qcow2);
    assert!("vmdk".parse::<ImageFormat>().is_err());
}

/// QEMU's rule: a raw image whose format was not given refuses guest
/// writes that would make its first sector look like an image.
#[test]
fn probed_raw_refuses_an_image_header_in_sector_0() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let header = qcow2_with_backing("secret");

    let d = disk::open(&img, &OpenOptions::default()).unwrap();
    let e = d.write_at(&header[..512], 0).unwrap_err();
    assert!(matches!(e, Error::FirstSectorGuard("qcow2")), "{e}");
    // Byte by byte does not get round it either.
    d.write_at(&[0u8; 512], 0).unwrap();
    let mut sector = [0u8; 512];
    for i in 0..4 {
        sector[i] = header[i];
        let r = d.write_at(&sector, 0);
        assert_eq!(r.is_err(), i == 3, "byte {i}: {r:?}");
    }
    // Nor zeroing bytes away from "QED\x01" to leave "QED\0".
    d.write_at(b"QED\x01", 0).unwrap();
    assert!(d.write_zeroes(3, 509, false).is_err());
    // Ordinary data, a partition table, and writes past sector 0 are fine.
    let mut mbr = [0u8; 512];
    mbr[446] = 0x80;
    mbr[510..].copy_from_slice(&[0x55, 0xaa]);
    d.write_at(&mbr, 0).unwrap();
    d.write_at(&header[..512], 4096).unwrap();
    d.write_zeroes(0, 4096, true).unwrap();
    d.flush().unwrap();
    drop(d);
    assert_eq!(&std::fs::read(&img).unwrap()[..4], &[0, 0, 0, 0]);

    // With the format given, the guest owns every byte (as in QEMU).
    let opts = OpenOptions {
        format: Some(ImageFormat::Raw),
        ..Default::default()
    };
    let d = disk::open(&img, &opts).unwrap();
    d.write_at(&header[..512], 0).unwrap();
    d.flush().unwrap();
}

/// The exploit, had the header got in (say through `format=raw`): the next
/// open never follows it to the host file.
#[test]
fn a_planted_header_is_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..512].copy_from_slice(&qcow2_with_backing("secret")[..512]);
    let img = dir.path().join("disk.img");
    std::fs::write(&img, &bytes).unwrap();

    // No format: the name says raw, the bytes say qcow2; refused, clearly.
    for ro in [true, false] {
        let opts = OpenOptions {
            read_only: ro,
            format: None,
        };
        let e = disk::open(&img, &opts).err().expect("opened");
        assert!(matches!(e, Error::FormatMismatch { .. }), "{e}");
        assert!(
            e.to_string().contains("disk.img") && e.to_string().contains("format="),
            "{e}"
        );
    }
    assert!(matches!(
        disk::ops::info(&img, None, &BackingRules::default()),
        Err(Error::FormatMismatch { .. })
    ));
    // format=raw: the guest sees its own bytes, not the host's.
    let opts = OpenOptions {
        format: Some(ImageFormat::Raw),
        ..Default::default()
    };
    let d = disk::open(&img, &opts).unwrap();
    let b = read_start(&*d);
    assert_eq!(&b[..4], b"QFI\xfb");
    assert!(!sees_secret(&b));
    drop(d);
    // Only the user saying qcow2 follows the header.
    let opts = OpenOptions {
        read_only: true,
        format: Some(ImageFormat::Qcow2),
    };
    let d = disk::open(&img, &opts).unwrap();
    assert!(sees_secret(&read_start(&*d)));
}

/// A backing file without a recorded format gets the same rule: its name
/// decides, so a guest-written header in a raw base is not followed.
#[test]
fn backing_files_without_a_format_follow_the_name_rule() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    // base.img: a raw base in which a guest once planted a header.
    let mut base = vec![0u8; 1 << 20];
    base[..512].copy_from_slice(&qcow2_with_backing("secret")[..512]);
    std::fs::write(dir.path().join("base.img"), &base).unwrap();
    let top = dir.path().join("top.qcow2");
    std::fs::write(&top, qcow2_with_backing("base.img")).unwrap();
    let e = disk::open(&top, &OpenOptions::default()).err().expect("opened");
    assert!(matches!(e, Error::FormatMismatch { .. }), "{e}");

    // A clean raw base without a recorded format: read as raw.
    base[..512].fill(7);
    std::fs::write(dir.path().join("base.img"), &base).unwrap();
    let d = disk::open(&top, &OpenOptions::default()).unwrap();
    assert_eq!(read_start(&*d)[..512], [7u8; 512]);
    drop(d);

    // A base named .qcow2 without a recorded format: read as qcow2.
    std::fs::write(dir.path().join("mid.qcow2"), qcow2_with_backing("base.img")).unwrap();
    std::fs::write(&top, qcow2_with_backing("mid.qcow2")).unwrap();
    let d = disk::open(&top, &OpenOptions::default()).unwrap();
    assert_eq!(read_start(&*d)[..512], [7u8; 512]);
}

/// Our hand-made image is a valid qcow2 image by QEMU's own checker, so the
/// tests above exercise a header QEMU would really follow.
#[test]
fn the_planted_header_is_one_qemu_would_follow() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let p = dir.path().join("h.qcow2");
    std::fs::write(&p, qcow2_with_backing("secret")).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&p)
        .output()
        .expect("qemu-img (the tests need qemu-utils)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read -v 0 32"])
        .arg(&p)
        .output()
        .expect("qemu-io");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("48 4f 53 54 2d 53 45 43 52 45 54"),
        "qemu-io did not follow the backing file:\n{s}"
    );
}

/// `vessel disk`'s operations take the format too.
#[test]
fn disk_operations_take_an_explicit_format() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    disk::ops::create(&img, Some(1 << 20), None, &BackingRules::default()).unwrap();
    // A qcow2 image named .img: refused without a format, fine with one.
    assert!(matches!(
        disk::ops::info(&img, None, &BackingRules::default()),
        Err(Error::FormatMismatch { .. })
    ));
    let layers = disk::ops::info(&img, Some(ImageFormat::Qcow2), &BackingRules::default()).unwrap();
    assert_eq!(layers[0].format, ImageFormat::Qcow2);
    let raw = dir.path().join("out.raw");
    disk::ops::convert(
        &img,
        Some(ImageFormat::Qcow2),
        &raw,
        ImageFormat::Raw,
        &BackingRules::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 20);
}
