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

use common::{b64, cpu_sum};

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

/// The tests take turns: they share the nested environment's build
/// (guest/build-nested.sh writes one set of files), and one QEMU TCG at a
/// time is all two cores carry within the scripts' timeouts.
static NESTED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    NESTED.lock().unwrap_or_else(|e| e.into_inner())
}

fn build_nested() {
    let build = Command::new(repo().join("guest/build-nested.sh"))
        .status()
        .expect("running guest/build-nested.sh");
    assert!(build.success(), "guest/build-nested.sh failed");
}

#[test]
fn nested_svm_boots_the_guest_with_kvm() {
    let _turn = take_turn();
    build_nested();
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

/// Snapshots across engines: a guest booted under emu (on this host) is
/// snapshotted in the middle of a checksummed loop; inside the nested
/// environment the snapshot is restored under kvm, which runs part of the
/// loop and is snapshotted in turn; that snapshot is restored under emu,
/// which finishes the loop. The sum must be right.
#[test]
fn nested_snapshots_move_between_emu_and_kvm() {
    let _turn = take_turn();
    use common::Scratch;

    let s = Scratch::new("nested-snap");
    let snap = emu_snapshot_mid_work(&s.0, &counted_work());

    build_nested();
    // Under kvm: 17 more progress marks (of the 19 left; or 4 minutes),
    // then a snapshot; emu, itself under QEMU TCG and slow there, finishes
    // the rest (about 100 s).
    let script = "export VESSEL_RUNTIME_DIR=/tmp/vr
/bin/vessel restore /snap1 --name k --accel kvm; rc1=$?
n=0; while [ $(grep -c ^PROGRESS /tmp/vr/k/console.log) -lt 17 ] && [ $n -lt 2400 ]; do sleep 0.1; n=$((n+1)); done
/bin/vessel snapshot k /tmp/snap2 --leave-paused; rc2=$?
sed 's/^/kvm-run: /' /tmp/vr/k/console.log /tmp/vr/.k.vmm.log
/bin/vessel stop k
/bin/vessel snapshot inspect /tmp/snap2 | sed 's/^/inspect: /'
/bin/vessel run --restore /tmp/snap2 --accel emu >/tmp/emu.out 2>&1 </dev/null; rc3=$?
sed 's/^/emu-run: /' /tmp/emu.out
echo \"NESTED-SNAP rc1=$rc1 rc2=$rc2 rc3=$rc3\"
";
    let text = run_nested_with_snapshot(&snap, script, "900");
    let line = text
        .lines()
        .find(|l| l.starts_with("NESTED-SNAP "))
        .unwrap_or_else(|| panic!("no result:\n{text}"));
    eprintln!("{line}");
    assert!(line.contains("rc1=0 rc2=0 rc3=0"), "{line}\n{text}");
    let kvm_progress = text.lines().filter(|l| l.starts_with("kvm-run: PROGRESS")).count();
    assert!(kvm_progress > 0, "the loop made no progress under kvm\n{text}");
    assert!(
        !text.contains("kvm-run: SUM="),
        "the loop ended under kvm; make it longer\n{text}"
    );
    assert!(text.contains("inspect: engine:     kvm"), "{text}");
    let emu_progress = text.lines().filter(|l| l.starts_with("emu-run: PROGRESS")).count();
    assert!(emu_progress > 0, "the loop made no progress under emu\n{text}");
    let want = format!("emu-run: SUM={}", cpu_sum(1, WORK_N));
    assert!(text.lines().any(|l| l.trim_end() == want), "wanted {want:?}\n{text}");
    eprintln!("progress marks: {kvm_progress} under kvm, {emu_progress} under emu");
}

/// The checksummed loop the cross-engine tests run: WORK_N steps, a
/// PROGRESSi line every WORK_STEP, then SUM= and WORK-DONE.
const WORK_N: u64 = 40_000;
const WORK_STEP: u64 = 2_000;

fn counted_work() -> String {
    format!(
        "s=1; i=0; while [ $i -lt {WORK_N} ]; do s=$(( (s*31 + i) % 1000003 )); i=$((i+1)); \
         [ $((i % {WORK_STEP})) -eq 0 ] && echo PROGRESS$i; done; echo SUM=$s; echo WORK-DONE"
    )
}

/// The same loop without an end: every WORK_STEP steps it prints
/// `PROGRESSi SUM=s`, the sum so far, which the host checks.
fn endless_work() -> String {
    format!(
        "s=1; i=0; while true; do s=$(( (s*31 + i) % 1000003 )); i=$((i+1)); \
         [ $((i % {WORK_STEP})) -eq 0 ] && echo PROGRESS$i SUM=$s; done"
    )
}

/// Boot the minimal guest under emu on this host, running `work`, and
/// snapshot it (to `dir/snap1`) once its loop is under way.
fn emu_snapshot_mid_work(dir: &std::path::Path, work: &str) -> PathBuf {
    use std::process::Stdio;
    use std::time::Duration;

    use common::{artifact, runtime_cmd, Reaper, TimedOutput};

    const STEP: u64 = WORK_STEP;
    let run_dir = dir.join("run");
    let _reaper = Reaper(run_dir.clone());
    let snap = dir.join("snap1");
    let o = runtime_cmd(&run_dir)
        .args(["run", "--detach", "--name", "orig", "--accel", "emu", "--mem", "128M"])
        .arg("--kernel")
        .arg(artifact("kernel/vmlinux"))
        .arg("--initrd")
        .arg(artifact("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 no_timer_check vessel.cmd={} vessel.end=reboot",
            b64(work)
        ))
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let console = run_dir.join("orig/console.log");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains(&format!("PROGRESS{STEP}"))
    {
        assert!(start.elapsed() < Duration::from_secs(180), "the workload did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = runtime_cmd(&run_dir)
        .args(["snapshot", "orig", snap.to_str().unwrap(), "--leave-paused"])
        .stdin(Stdio::null())
        .timed_output()
        .unwrap();
    assert!(o.status.success(), "snapshot: {}", String::from_utf8_lossy(&o.stderr));
    let _ = runtime_cmd(&run_dir).args(["stop", "orig"]).timed_output();
    let before = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        !before.contains("SUM="),
        "the work ended before the snapshot:\n{before}"
    );
    snap
}

/// Run `script` in the nested environment with the snapshot `snap` at
/// /snap1; everything it printed. Fails unless /dev/kvm was there.
fn run_nested_with_snapshot(snap: &std::path::Path, script: &str, timeout_s: &str) -> String {
    let out = Command::new("timeout")
        .arg(timeout_s)
        .arg(repo().join("guest/run-nested.sh"))
        .args(["-m", "2G", "-f"])
        .arg(format!("{}:/snap1/state", snap.join("state").display()))
        .arg("-f")
        .arg(format!("{}:/snap1/memory", snap.join("memory").display()))
        .arg("--")
        .arg(script)
        .output()
        .expect("running guest/run-nested.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("NESTED-KVM-READY"),
        "no /dev/kvm in the nested environment:\n{text}"
    );
    text
}

/// Live migration across engines: the guest snapshotted mid-loop under
/// emu on this host is restored under emu inside the nested environment,
/// migrates live to a `vessel run --incoming --accel kvm` there, runs most
/// of the rest of the loop under kvm, and migrates live back to a
/// `--accel emu` Vessel, which finishes the loop. The sum must be right.
/// (Live kvm migrations of small payloads run on the host's own KVM:
/// crates/vmm/tests/kvm_migration.rs.)
#[test]
fn nested_live_migration_between_emu_and_kvm() {
    let _turn = take_turn();
    use common::Scratch;

    let s = Scratch::new("nested-mig");
    // Endless: kvm would finish a bounded loop while pre-copy runs.
    let snap = emu_snapshot_mid_work(&s.0, &endless_work());
    build_nested();
    // A detached VM's runtime directory (console and VMM logs) goes when
    // it ends: `tail -f` keeps reading them from the open file.
    let script = "export VESSEL_RUNTIME_DIR=/tmp/vr
/bin/vessel restore /snap1 --name src --accel emu; rc1=$?
/bin/vessel run --detach --name k --incoming unix:/tmp/m1.sock --accel kvm; rc2=$?
tail -n +1 -f /tmp/vr/k/vmm.log > /tmp/k.vmm & t1=$!
/bin/vessel migrate src --to unix:/tmp/m1.sock > /tmp/mig1 2>&1; rc3=$?
tail -n +1 -f /tmp/vr/k/console.log > /tmp/k.console & t2=$!
/bin/vessel run --detach --name e --incoming unix:/tmp/m2.sock --accel emu; rc4=$?
tail -n +1 -f /tmp/vr/e/vmm.log > /tmp/e.vmm & t3=$!
n=0; while [ $(grep -c ^PROGRESS /tmp/k.console) -lt 5 ] && [ $n -lt 2400 ]; do sleep 0.1; n=$((n+1)); done
/bin/vessel migrate k --to unix:/tmp/m2.sock > /tmp/mig2 2>&1; rc5=$?
tail -n +1 -f /tmp/vr/e/console.log > /tmp/e.console & t4=$!
n=0; while [ $(grep -c ^PROGRESS /tmp/e.console) -lt 1 ] && [ $n -lt 4000 ]; do sleep 0.1; n=$((n+1)); done
/bin/vessel stop e
sleep 1; kill $t1 $t2 $t3 $t4
sed 's/^/mig1: /' /tmp/mig1; sed 's/^/mig2: /' /tmp/mig2
sed 's/^/kvm-vmm: /' /tmp/k.vmm; sed 's/^/emu-vmm: /' /tmp/e.vmm
sed 's/^/kvm-run: /' /tmp/k.console; sed 's/^/emu-run: /' /tmp/e.console
echo \"NESTED-MIG rc1=$rc1 rc2=$rc2 rc3=$rc3 rc4=$rc4 rc5=$rc5\"
";
    let text = run_nested_with_snapshot(&snap, script, "1500");
    let line = text
        .lines()
        .find(|l| l.starts_with("NESTED-MIG "))
        .unwrap_or_else(|| panic!("no result:\n{text}"));
    eprintln!("{line}");
    for l in text.lines().filter(|l| l.starts_with("mig")) {
        eprintln!("{l}");
    }
    assert!(line.contains("rc1=0 rc2=0 rc3=0 rc4=0 rc5=0"), "{line}\n{text}");
    assert!(text.contains("mig1: migrated src to unix:/tmp/m1.sock"), "{text}");
    assert!(text.contains("mig2: migrated k to unix:/tmp/m2.sock"), "{text}");
    // Each destination ran the engine asked for, the source the other.
    assert!(
        text.contains("kvm-vmm: engine: kvm (asked for with --accel kvm) (the source ran emu)"),
        "{text}"
    );
    assert!(
        text.contains("emu-vmm: engine: emu (asked for with --accel emu) (the source ran kvm)"),
        "{text}"
    );
    // Every whole `PROGRESSi SUM=s` line carries the right sum for its i
    // (a line the switch cut in two is skipped), and emu goes on from
    // where kvm stopped.
    let marks = |prefix: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix)?.trim_end().strip_prefix("PROGRESS"))
            .filter_map(|l| {
                let (i, sum) = l.split_once(" SUM=")?;
                Some((i.parse::<u64>().ok()?, sum.parse::<u64>().ok()?))
            })
            .map(|(i, sum)| {
                assert_eq!(sum, cpu_sum(1, i), "the wrong sum after {i} steps ({prefix})\n{text}");
                i
            })
            .collect()
    };
    let kvm = marks("kvm-run: ");
    let emu = marks("emu-run: ");
    assert!(!kvm.is_empty(), "the loop made no progress under kvm\n{text}");
    assert!(!emu.is_empty(), "the loop made no progress under emu after kvm\n{text}");
    let (kvm_last, emu_first) = (kvm[kvm.len() - 1], emu[0]);
    assert!(
        emu_first > kvm_last && emu_first <= kvm_last + 2 * WORK_STEP,
        "emu went on at step {emu_first}, kvm had reached {kvm_last}\n{text}"
    );
    eprintln!(
        "progress marks after the migrations: {} under kvm (to step {kvm_last}), {} under emu (from step {emu_first})",
        kvm.len(),
        emu.len()
    );
}
