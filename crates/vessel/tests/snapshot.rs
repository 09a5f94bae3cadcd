//! Whole-VM snapshots end to end, under emu: a guest snapshotted in the
//! middle of CPU, memory and disk work is cloned twice, and each clone
//! finishes the work with the right results; the clock goes on; hostile
//! snapshot files are refused over the API while Vessel keeps serving.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn field<'a>(log: &'a str, key: &str) -> Option<&'a str> {
    log.lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)))
        .next_back()
}

#[test]
fn clones_finish_the_work_the_original_started() {
    let s = Scratch::new("snap-clones");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let snap = s.0.join("snap");
    let disk = s.0.join("ro.ext4");
    std::fs::copy(artifact("disk.ext4"), &disk).unwrap();
    const N: u64 = 20_000;
    let loop_of = |seed: u64| {
        format!("s={seed}; i=0; while [ $i -lt {N} ]; do s=$(( (s*31 + i) % 1000003 )); i=$((i+1)); done; echo SUM{seed}=$s")
    };
    let work = format!(
        "seq 1 200000 > /tmp/pat; echo PAT-READY; \
         (while true; do dd if=/dev/vda of=/dev/null bs=64k count=32 2>/dev/null; sleep 0.05; done) & \
         ({}) & p1=$!; ({}) & p2=$!; wait $p1 $p2; \
         echo PAT-SUM=$(md5sum < /tmp/pat | cut -c1-32); \
         echo SLEEP-START; sleep 1; echo SLEEP-END; echo WORK-DONE; sleep 100000",
        loop_of(1),
        loop_of(2)
    );
    launch(detached(&run_dir, "orig", "256M", &work).args(["--cpus", "2", "--disk", &disk_arg(&disk, "readonly=on")]));
    wait_log(&run_dir, "orig", "PAT-READY", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(700));
    cli_ok(&run_dir, &["snapshot", "orig", snap.to_str().unwrap()]);
    let before = console_log(&run_dir, "orig");
    assert!(
        !before.contains("SUM1="),
        "the work ended before the snapshot; make it longer"
    );
    let inspect = String::from_utf8_lossy(&cli_ok(&run_dir, &["snapshot", "inspect", snap.to_str().unwrap()]).stdout)
        .into_owned();
    assert!(
        inspect.contains("vcpus:      2") && inspect.contains("block"),
        "{inspect}"
    );

    let names = String::from_utf8_lossy(&cli_ok(&run_dir, &["restore", snap.to_str().unwrap(), "--count", "2"]).stdout)
        .into_owned();
    let clones: Vec<&str> = names.lines().collect();
    assert_eq!(clones, ["snap-1", "snap-2"]);

    let pattern: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    let want_pat = md5_of(pattern.as_bytes());
    // Watch all three at once, noting when each line first shows.
    let vms = ["orig", "snap-1", "snap-2"];
    let mut seen: Vec<[Option<Instant>; 2]> = vec![[None, None]; vms.len()];
    let start = Instant::now();
    while seen.iter().any(|s| s[1].is_none()) {
        for (i, vm) in vms.iter().enumerate() {
            let l = console_log(&run_dir, vm);
            for (j, mark) in ["SLEEP-START", "SLEEP-END"].iter().enumerate() {
                if seen[i][j].is_none() && l.contains(mark) {
                    seen[i][j] = Some(Instant::now());
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(480),
            "the work did not finish: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for (i, vm) in vms.iter().enumerate() {
        let l = console_log(&run_dir, vm);
        let slept = seen[i][1].unwrap() - seen[i][0].unwrap();
        assert!(
            slept > Duration::from_millis(500) && slept < Duration::from_secs(4),
            "{vm}: sleep 1 took {slept:?}"
        );
        assert_eq!(
            field(&l, "SUM1="),
            Some(cpu_sum(1, N).to_string().as_str()),
            "{vm}:\n{l}"
        );
        assert_eq!(
            field(&l, "SUM2="),
            Some(cpu_sum(2, N).to_string().as_str()),
            "{vm}:\n{l}"
        );
        assert_eq!(
            field(&l, "PAT-SUM="),
            Some(want_pat.as_str()),
            "{vm}: memory pattern damaged"
        );
        assert!(!l.contains("soft lockup") && !l.contains("Oops"), "{vm}:\n{l}");
    }
    for vm in ["orig", "snap-1", "snap-2"] {
        cli_ok(&run_dir, &["stop", vm]);
    }
}

/// Truncated, bit-flipped, version-bumped and out-of-range snapshot files
/// each get a 400 with a clear message, and Vessel keeps serving; the
/// untouched snapshot then loads and runs.
#[test]
fn hostile_snapshot_files_are_refused() {
    let s = Scratch::new("snap-hostile");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let snap = s.0.join("snap");
    let ticker = "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.2; done";
    launch(&mut detached(&run_dir, "src", "128M", ticker));
    wait_log(&run_dir, "src", "tick2", Duration::from_secs(120));
    cli_ok(&run_dir, &["snapshot", "src", snap.to_str().unwrap(), "--leave-paused"]);
    cli_ok(&run_dir, &["stop", "src"]);
    let good = std::fs::read(snap.join("state")).unwrap();
    let mem = snap.join("memory");

    let mut bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("empty", Vec::new(), "truncated"),
        (
            "not a snapshot",
            b"hello world, not a snapshot at all".to_vec(),
            "not a Vessel snapshot",
        ),
    ];
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    bad.push(("bit-flipped", flipped, "checksum"));
    let mut version = good.clone();
    version[8] = 99;
    bad.push(("version-bumped", version, "version 99"));
    let mut huge = good.clone();
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    bad.push(("length out of range", huge, "limit"));
    // Counts out of range, with a valid checksum: 9 vCPUs declared, 1 saved.
    let json_start = 24;
    let payload = &good[json_start..good.len() - 8];
    // (Edited as text: the state holds 128-bit numbers that a JSON value
    // type would round.)
    let text = String::from_utf8(payload.to_vec()).unwrap();
    assert!(text.contains("\"cpus\":1,") && text.contains("\"mem_size\":134217728,"));
    let forged = reencode(&good, text.replacen("\"cpus\":1,", "\"cpus\":9,", 1).as_bytes());
    bad.push(("vCPU count out of range", forged, "vCPU states"));
    let forged = reencode(
        &good,
        text.replacen("\"mem_size\":134217728,", "\"mem_size\":1099511627776,", 1)
            .as_bytes(),
    );
    bad.push(("memory size not the memory file's", forged, "memory"));

    let sock = s.0.join("api.sock");
    let mut vmm = vessel()
        .arg("run")
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _dog = Watchdog::new(&vmm);
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    for (what, bytes, expect) in &bad {
        let f = s.0.join("bad-state");
        std::fs::write(&f, bytes).unwrap();
        let body = serde_json::json!({
            "snapshot_path": f,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
        })
        .to_string();
        let (code, text) = curl(&sock, "PUT", "/snapshot/load", Some(&body));
        assert_eq!(code, 400, "{what}: {text}");
        assert!(text.contains(expect), "{what}: {text}");
        let (code, text) = curl(&sock, "GET", "/", None);
        assert!(code == 200 && text.contains("Not started"), "{what}: {text}");
    }
    // A memory file of the wrong size.
    let short = s.0.join("short-mem");
    std::fs::write(&short, [0u8; 4096]).unwrap();
    let body = serde_json::json!({
        "snapshot_path": snap.join("state"),
        "mem_backend": {"backend_type": "File", "backend_path": short},
    })
    .to_string();
    let (code, text) = curl(&sock, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(code, 400, "{text}");
    // The real one loads and runs.
    let body = serde_json::json!({
        "snapshot_path": snap.join("state"),
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    })
    .to_string();
    let (code, text) = curl(&sock, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(code, 204, "{text}");
    let (_, info) = curl(&sock, "GET", "/", None);
    assert!(info.contains("Running"), "{info}");
    std::thread::sleep(Duration::from_secs(2));
    let _ = vmm.kill();
    let out = vmm.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tick"), "the restored guest printed nothing:\n{text}");
}

/// A snapshot file with `payload` in place of the original's, with a
/// correct length and checksum.
fn reencode(original: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = original[..16].to_vec();
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc64(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// CRC-64/ECMA-182 (the snapshot file's checksum), bit by bit.
fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0x42F0_E1EB_A9EA_3693;
    let mut crc = 0u64;
    for &b in data {
        crc ^= (b as u64) << 56;
        for _ in 0..8 {
            crc = if crc & (1 << 63) != 0 {
                (crc << 1) ^ POLY
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The guest's disk as a flat image, read through its whole qcow2 chain.
fn disk_bytes(s: &Scratch, top: &Path) -> Vec<u8> {
    let out = s.0.join("flat.raw");
    let o = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(top)
        .arg(&out)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img convert {}: {}",
        top.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(&out).unwrap()
}

/// The counter the guest last wrote at 1 MiB (`N=%08d`).
fn counter_of(flat: &[u8]) -> u64 {
    let rec = &flat[1 << 20..(1 << 20) + 10];
    assert_eq!(&rec[..2], b"N=", "no counter on the disk: {rec:?}");
    std::str::from_utf8(&rec[2..]).unwrap().parse().unwrap()
}

fn qemu_img_check(layer: &Path) {
    let o = std::process::Command::new("qemu-img")
        .args(["check", "-U", "-f", "qcow2"])
        .arg(layer)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img check {}: {}{}",
        layer.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A qcow2 disk is frozen into the snapshot: what the guest wrote before
/// the snapshot is in every clone, what the original wrote after it is in
/// none, each clone writes a layer of its own, and every layer checks clean.
#[test]
fn qcow2_disks_are_frozen_into_the_snapshot() {
    let s = Scratch::new("snap-disks");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let snap = s.0.join("snap");
    let img = s.0.join("d.qcow2");
    let o = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let work = "printf BEFORE-MARK | dd of=/dev/vda bs=512 count=1 conv=sync,notrunc 2>/dev/null; sync; \
                i=0; while true; do printf N=%08d $i | dd of=/dev/vda bs=512 seek=2048 count=1 conv=sync,notrunc \
                2>/dev/null; sync; echo W$i; i=$((i+1)); sleep 0.1; done";
    launch(detached(&run_dir, "orig", "128M", work).args(["--disk", &disk_arg(&img, "")]));
    wait_line(&run_dir, "orig", "W3", Duration::from_secs(120));
    cli_ok(&run_dir, &["snapshot", "orig", snap.to_str().unwrap()]);
    let inspect = String::from_utf8_lossy(&cli_ok(&run_dir, &["snapshot", "inspect", snap.to_str().unwrap()]).stdout)
        .into_owned();
    let frozen = inspect
        .lines()
        .find_map(|l| l.trim().strip_prefix("disk0:"))
        .and_then(|l| l.trim().strip_suffix("(frozen in the snapshot)"))
        .map(|p| std::path::PathBuf::from(p.trim()))
        .unwrap_or_else(|| panic!("disk0 is not frozen:\n{inspect}"));
    assert!(
        frozen.file_name().unwrap().to_string_lossy().starts_with("d@vmsnap-"),
        "{}",
        frozen.display()
    );
    let frozen_flat = disk_bytes(&s, &frozen);
    assert_eq!(&frozen_flat[..11], b"BEFORE-MARK");
    let at_snapshot = counter_of(&frozen_flat);
    let frozen_md5 = md5_of(&std::fs::read(&frozen).unwrap());

    // Clones wait paused while the original writes on.
    cli(
        &run_dir,
        &["restore", snap.to_str().unwrap(), "--count", "2", "--paused"],
    );
    let stem = frozen.file_stem().unwrap().to_string_lossy().into_owned();
    let overlays: Vec<std::path::PathBuf> = std::fs::read_dir(&s.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&format!("{stem}.")) && n.ends_with(".qcow2") && *p != frozen
        })
        .collect();
    assert_eq!(overlays.len(), 2, "one overlay per clone: {overlays:?}");
    let later = format!("W{}", at_snapshot + 12);
    wait_line(&run_dir, "orig", &later, Duration::from_secs(60));
    cli_ok(&run_dir, &["stop", "orig"]);
    let orig_after = counter_of(&disk_bytes(&s, &img));
    assert!(orig_after > at_snapshot + 5, "{orig_after} vs {at_snapshot}");
    for o in &overlays {
        let flat = disk_bytes(&s, o);
        assert_eq!(&flat[..11], b"BEFORE-MARK", "{}", o.display());
        assert_eq!(
            counter_of(&flat),
            at_snapshot,
            "{}: the original's writes after the snapshot reached a clone",
            o.display()
        );
    }

    // Each clone writes its own overlay.
    for vm in ["snap-1", "snap-2"] {
        cli_ok(&run_dir, &["resume", vm]);
    }
    for vm in ["snap-1", "snap-2"] {
        let next = format!("W{}", at_snapshot + 3);
        wait_line(&run_dir, vm, &next, Duration::from_secs(60));
        cli_ok(&run_dir, &["stop", vm]);
    }
    for o in &overlays {
        let flat = disk_bytes(&s, o);
        assert_eq!(&flat[..11], b"BEFORE-MARK", "{}", o.display());
        assert!(
            counter_of(&flat) > at_snapshot,
            "{}: the clone did not write",
            o.display()
        );
    }
    assert_eq!(
        md5_of(&std::fs::read(&frozen).unwrap()),
        frozen_md5,
        "the frozen layer changed"
    );
    assert_eq!(counter_of(&disk_bytes(&s, &img)), orig_after);
    for layer in overlays.iter().chain([&frozen, &img]) {
        qemu_img_check(layer);
    }
}

/// `RNDi=VALUE` lines printed after `after` in a console log.
fn random_lines(log: &str, after: &str) -> Vec<(String, String)> {
    let Some(at) = log.find(after) else {
        return Vec::new();
    };
    log[at..]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RND"))
        .filter_map(|l| l.split_once('='))
        .filter(|(_, v)| v.len() == 16)
        .map(|(i, v)| (i.to_string(), v.to_string()))
        .collect()
}

/// Clones get a new VM generation ID (VMGenID): Debian's kernel binds its
/// vmgenid driver to our ACPI device, and each restored clone reseeds its
/// random generator, so two clones no longer read the same random bytes.
#[test]
fn clones_get_a_new_generation_id_and_reseed() {
    let s = Scratch::new("snap-vmgenid");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let snap = s.0.join("snap");
    let work = "echo DRIVER=$(ls /sys/bus/acpi/drivers/vmgenid | grep VSSL0001); \
                i=0; while true; do echo RND$i=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
                i=$((i+1)); sleep 0.3; done";
    launch(&mut detached_on(&run_dir, "orig", "debian/vmlinux", "512M", work));
    let l = wait_log(&run_dir, "orig", "RND2=", Duration::from_secs(240));
    assert!(
        l.contains("DRIVER=VSSL0001:00"),
        "the guest's vmgenid driver did not bind to our device:\n{l}"
    );
    cli_ok(
        &run_dir,
        &["snapshot", "orig", snap.to_str().unwrap(), "--leave-paused"],
    );
    cli_ok(&run_dir, &["stop", "orig"]);
    cli_ok(&run_dir, &["restore", snap.to_str().unwrap(), "--count", "2"]);
    const RESEED: &str = "crng reseeded due to virtual machine fork";
    let start = Instant::now();
    let (a, b) = loop {
        let a = random_lines(&console_log(&run_dir, "snap-1"), RESEED);
        let b = random_lines(&console_log(&run_dir, "snap-2"), RESEED);
        if a.len() >= 3 && b.len() >= 3 {
            break (a, b);
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the clones did not reseed and print:\nsnap-1:\n{}\nsnap-2:\n{}",
            console_log(&run_dir, "snap-1"),
            console_log(&run_dir, "snap-2")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let same: Vec<_> = a.iter().filter(|x| b.contains(x)).collect();
    assert!(same.is_empty(), "the clones read the same random bytes: {same:?}");
    for vm in ["snap-1", "snap-2"] {
        cli_ok(&run_dir, &["stop", vm]);
    }
}

/// `network_overrides` give a restored VM another TAP (Firecracker) and, as
/// a Vessel extension, a MAC address of its own for the device.
#[test]
fn network_overrides_give_a_clone_its_own_tap_and_mac() {
    let s = Scratch::new("snap-netover");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let snap = s.0.join("snap");
    let tap = format!("vso{}", std::process::id() % 100_000);
    let tap2 = format!("vsc{}", std::process::id() % 100_000);
    launch(
        detached(
            &run_dir,
            "src",
            "128M",
            "echo MAC=$(cat /sys/class/net/eth0/address); sleep 100000",
        )
        .args(["--net", &format!("tap={tap},mac=52:54:00:00:00:01")]),
    );
    wait_log(&run_dir, "src", "MAC=52:54:00:00:00:01", Duration::from_secs(120));
    cli_ok(&run_dir, &["snapshot", "src", snap.to_str().unwrap(), "--leave-paused"]);
    cli_ok(&run_dir, &["stop", "src"]);

    let sock = s.0.join("api.sock");
    let vmm = KillOnDrop(
        vessel()
            .arg("run")
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _dog = Watchdog::new(&vmm.0);
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let load = |mac: &str| {
        serde_json::json!({
            "snapshot_path": snap.join("state"),
            "mem_backend": {"backend_type": "File", "backend_path": snap.join("memory")},
            "network_overrides": [{"iface_id": "net0", "host_dev_name": tap2, "guest_mac": mac}],
        })
        .to_string()
    };
    let (code, text) = curl(&sock, "PUT", "/snapshot/load", Some(&load("52:54:00:zz:00:02")));
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("guest_mac"), "{text}");
    let (code, text) = curl(&sock, "PUT", "/snapshot/load", Some(&load("52:54:00:00:00:02")));
    assert_eq!(code, 204, "{text}");
    let (code, config) = curl(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200, "{config}");
    let v: serde_json::Value = serde_json::from_str(&config).unwrap();
    let net = &v["network-interfaces"][0];
    assert_eq!(net["host_dev_name"], tap2.as_str(), "{config}");
    assert_eq!(
        net["guest_mac"].as_str().map(str::to_lowercase).as_deref(),
        Some("52:54:00:00:00:02"),
        "{config}"
    );
    let (code, _) = curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(code, 204);
    let (_, info) = curl(&sock, "GET", "/", None);
    assert!(info.contains("Running"), "{info}");
}
