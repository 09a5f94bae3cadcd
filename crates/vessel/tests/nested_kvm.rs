//! The kvm engine end to end, under nested SVM: QEMU TCG with `-cpu max`
//! offers SVM, Debian's stock kernel there loads kvm_amd, and a static
//! `vessel run --accel kvm` boots the minimal test guest inside with 1 and
//! with 2 vCPUs, to its marker and a clean exit; then pauses and resumes
//! a running VM, whose vCPUs go through `CpuState` (KVM_GET_* converted,
//! and converted back with KVM_SET_*) while paused.
//!
//! Needs `WITH_DEBIAN_KERNEL=1 guest/build-all.sh` (scripts/test-all runs
//! it) and qemu-system-x86 (installed by the guest scripts when missing).
//! The test builds the nested initramfs itself (guest/build-nested.sh).
//! Takes about a minute on 2 cores, most of it QEMU TCG booting Debian.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::b64;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The script the QEMU guest runs: boot the minimal guest under kvm with
/// each vCPU count, print its console prefixed, then one result line.
fn outer_script(cpus: &[u32]) -> String {
    let inner = b64("echo inner-cpus=$(grep -c ^processor /proc/cpuinfo) \
         inner-clock=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource); \
         echo inner-rng=$(cat /sys/class/misc/hw_random/rng_current) \
         inner-rng-bytes=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n' | wc -c); \
         echo written-by-the-guest | dd of=/dev/vda conv=fsync 2>/dev/null; \
         echo inner-blk=$(dd if=/dev/vda bs=20 count=1 2>/dev/null)");
    let mut s = String::new();
    for n in cpus {
        // One vCPU ends by halting for good (Vessel must notice every vCPU
        // in HLT with interrupts off), more by the i8042 reset.
        let end = if *n == 1 { "halt" } else { "reboot" };
        s.push_str(&format!(
            "dd if=/dev/zero of=/tmp/d{n}.img bs=1M count=4 2>/dev/null; \
             start=$(cat /proc/uptime); /bin/vessel run --accel kvm --cpus {n} --mem 256M --kernel /guest/vmlinux \
             --rng --disk path=/tmp/d{n}.img --initrd /guest/initramfs.cpio.gz --cmdline 'console=ttyS0 reboot=k panic=-1 vessel.cmd={inner} vessel.end={end}' \
             >/tmp/out{n} 2>&1 </dev/null; rc=$?; end=$(cat /proc/uptime); sed 's/^/inner{n}: /' /tmp/out{n}; \
             echo \"NESTED-RESULT cpus={n} rc=$rc ready=$(grep -c VESSEL-GUEST-READY /tmp/out{n}) \
             $(grep -o 'inner-cpus=[0-9]*' /tmp/out{n}) $(grep -o 'inner-clock=[a-z-]*' /tmp/out{n}) \
             $(grep -o 'inner-rng=[a-z_]*' /tmp/out{n}) $(grep -o 'inner-rng-bytes=[0-9]*' /tmp/out{n}) \
             $(grep -o 'inner-blk=[a-z-]*' /tmp/out{n}) host-blk=$(head -c 20 /tmp/d{n}.img) \
             start=${{start%% *}} end=${{end%% *}}\"\n"
        ));
    }
    s
}

/// Pause and resume a running kvm VM (SIGUSR1/SIGUSR2) while its guest
/// prints a tick a second: no ticks while paused, all of them in the end.
fn pause_script() -> String {
    let ticks = b64("i=0; while [ $i -lt 8 ]; do echo tick$i; i=$((i+1)); sleep 1; done");
    format!(
        "/bin/vessel run --accel kvm --cpus 2 --mem 256M --kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz \
         --cmdline 'console=ttyS0 reboot=k panic=-1 vessel.cmd={ticks}' >/tmp/p 2>&1 </dev/null & pid=$!
         n=0; while ! grep -q tick2 /tmp/p && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
         kill -USR1 $pid; sleep 0.5; a=$(grep -c '^tick' /tmp/p); sleep 3; b=$(grep -c '^tick' /tmp/p)
         kill -USR2 $pid; wait $pid; rc=$?; c=$(grep -c '^tick' /tmp/p); sed 's/^/pause: /' /tmp/p
         echo \"NESTED-PAUSE rc=$rc before=$a after=$b end=$c paused=$(grep -c 'vessel: paused' /tmp/p) \
         states=$(grep -c 'vcpu0 rip=0x[0-9a-f]*, vcpu1 rip=0x' /tmp/p)\"\n"
    )
}

#[test]
fn nested_svm_boots_the_guest_with_kvm() {
    let build = Command::new(repo().join("guest/build-nested.sh"))
        .status()
        .expect("running guest/build-nested.sh");
    assert!(build.success(), "guest/build-nested.sh failed");
    let out = Command::new("timeout")
        .arg("300")
        .arg(repo().join("guest/run-nested.sh"))
        .arg("--")
        .arg(outer_script(&[1, 2]) + &pause_script())
        .output()
        .expect("running guest/run-nested.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("NESTED-KVM-READY"),
        "no /dev/kvm in the nested environment:\n{text}"
    );
    for n in [1, 2] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("NESTED-RESULT cpus={n} ")))
            .unwrap_or_else(|| panic!("no result for {n} vCPUs:\n{text}"));
        eprintln!("{line}");
        assert!(line.contains(" rc=0 "), "vessel failed with {n} vCPUs: {line}\n{text}");
        assert!(
            line.contains(" ready=1 "),
            "no VESSEL-GUEST-READY with {n} vCPUs\n{text}"
        );
        assert!(
            line.contains(&format!("inner-cpus={n} ")),
            "guest saw the wrong CPU count\n{text}"
        );
        assert!(
            line.contains("inner-clock=kvm-clock"),
            "guest did not use kvmclock: {line}"
        );
        // virtio under kvm: doorbells through ioeventfd, interrupts through irqfd.
        assert!(line.contains("inner-rng=virtio_rng"), "no virtio-rng: {line}\n{text}");
        assert!(
            line.contains("inner-rng-bytes=32 "),
            "no bytes from virtio-rng: {line}\n{text}"
        );
        assert!(
            line.contains("inner-blk=written-by-the-guest "),
            "virtio-blk read back: {line}\n{text}"
        );
        assert!(
            line.contains("host-blk=written-by-the-guest "),
            "virtio-blk on the host: {line}\n{text}"
        );
        assert!(
            text.contains(&format!("inner{n}: VESSEL-CMD-EXIT=0")),
            "guest command failed with {n} vCPUs\n{text}"
        );
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("NESTED-PAUSE "))
        .unwrap_or_else(|| panic!("no pause result:\n{text}"));
    eprintln!("{line}");
    let field = |k: &str| -> Option<u32> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
    };
    assert_eq!(field("rc"), Some(0), "{text}");
    assert_eq!(field("paused"), Some(1), "vessel did not report the pause\n{text}");
    // Both vCPUs' states came out of KVM as CpuState, and the guest went on
    // from the state converted back.
    assert_eq!(field("states"), Some(1), "no vCPU states while paused\n{text}");
    assert_eq!(field("before"), field("after"), "the guest ran while paused\n{text}");
    assert_eq!(field("end"), Some(8), "the guest did not finish after resume\n{text}");
}
