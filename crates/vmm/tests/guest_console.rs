//! Serial console input beyond the UART's 64-byte FIFO reaches the real
//! guest whole: 4 KiB typed at once (a paste) all arrive, in order.

mod common;

use std::time::Duration;

use common::{guest_config, tail, Guest};
use vmm::machine::RunOutcome;

const LINE_TAIL: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ012345";

#[test]
fn four_kib_of_console_input_arrive_whole() {
    // 64 lines of 64 bytes: "0001:" + 58 letters + newline. The guest
    // writes the same text itself and compares.
    let text: String = (1..=64).map(|i| format!("{i:04}:{LINE_TAIL}\n")).collect();
    assert_eq!(text.len(), 4096);
    let cmd = format!(
        "echo SEND-NOW; head -c 4096 > /tmp/f; echo got=$(wc -c < /tmp/f); \
         i=1; while [ $i -le 64 ]; do printf '%04d:%s\\n' $i {LINE_TAIL}; i=$((i+1)); done > /tmp/want; \
         cmp /tmp/f /tmp/want && echo INPUT-INTACT"
    );
    let guest = Guest::boot(guest_config(&cmd, "reboot"), None);
    guest.wait_for("SEND-NOW");
    // All at once, as a paste.
    assert_eq!(guest.input.send(text.as_bytes()), text.len());
    guest.wait_for("VESSEL-CMD-EXIT=");
    let log = guest.console.clone();
    let outcome = guest.finish(Duration::from_secs(60));
    let out = log.text();
    assert_eq!(outcome, RunOutcome::Reset, "{}", tail(&out));
    assert!(out.contains("got=4096"), "not all input arrived:\n{}", tail(&out));
    assert!(
        out.contains("INPUT-INTACT"),
        "input changed on the way:\n{}",
        tail(&out)
    );
    assert!(out.contains("VESSEL-CMD-EXIT=0"), "{}", tail(&out));
}
