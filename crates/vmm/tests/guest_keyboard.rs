//! Ctrl-Alt-Del through the i8042 (Firecracker's `SendCtrlAltDel`) on the
//! real guest: Linux's i8042 and atkbd drivers find the keyboard, and the
//! key press restarts the guest, which resets through the i8042
//! (`reboot=k`) and ends the run with `Reset`.

mod common;

use std::time::{Duration, Instant};

use common::{guest_config, tail, Guest};
use vmm::devices::i8042::KeyError;
use vmm::machine::RunOutcome;

#[test]
fn ctrl_alt_del_resets_the_guest() {
    // A command that would keep the guest busy for ten minutes.
    let cmd = "[ -e /sys/class/tty/tty0 ] && echo HAS-VT; echo LONG-SLEEP; sleep 600";
    let guest = Guest::boot(guest_config(cmd, "reboot"), None);
    guest.wait_for("LONG-SLEEP");
    // atkbd binds to the port from the serio thread; wait for it (a
    // kernel without the i8042, atkbd or VT drivers fails here).
    guest.wait_for_within("input: AT Raw Set 2 keyboard", Duration::from_secs(20));
    let log = guest.console.clone();
    let boot_log = log.text();
    assert!(
        boot_log.contains("HAS-VT"),
        "the guest kernel has no virtual terminal (CONFIG_VT in guest/kernel.config): only its \
         keyboard handler turns Ctrl-Alt-Del into a restart"
    );
    assert!(
        boot_log.contains("serio: i8042 KBD port at 0x60,0x64 irq 1"),
        "the i8042 probe failed:\n{}",
        tail(&boot_log)
    );
    assert!(!boot_log.contains("i8042: Can't"), "{}", tail(&boot_log));
    // Not while paused: the devices must not change then.
    assert!(guest.vm.pause(Duration::from_secs(10)));
    assert_eq!(guest.vm.send_ctrl_alt_del(), Err(KeyError::Paused));
    guest.vm.resume();
    let t0 = Instant::now();
    guest.vm.send_ctrl_alt_del().expect("the keyboard takes the keys");
    let outcome = guest.finish(Duration::from_secs(30));
    let took = t0.elapsed();
    assert_eq!(outcome, RunOutcome::Reset, "{}", tail(&log.text()));
    assert!(
        !log.text().contains("VESSEL-CMD-EXIT"),
        "the command ended by itself: {}",
        tail(&log.text())
    );
    eprintln!("Ctrl-Alt-Del to Reset: {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
