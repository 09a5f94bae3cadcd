//! Density: fifty idle minimal guests (64 MiB, emu) started at once, as a
//! burst of `vessel run` would, all boot without a panic on this 2-core
//! machine, and together use under half a core while idle; the VMM's own
//! memory per idle VM (PSS minus guest RAM) is at most 5 MiB, Firecracker's
//! bound (docs/BENCHMARKS.md has the figures).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const GUESTS: usize = 50;

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at 3.
    n(11) + n(12)
}

/// Kilobytes of a process's proportional set size, and of its largest
/// resident anonymous mapping (the guest's RAM).
fn memory_kb(pid: i32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut pss, mut guest, mut cur_rss) = (0u64, 0u64, 0u64);
    for line in smaps.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("Pss:") => pss += w.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0),
            Some("Rss:") => cur_rss = w.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("Anonymous:") => {
                let anon: u64 = w.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                if anon > 0 {
                    guest = guest.max(cur_rss);
                }
            }
            _ => {}
        }
    }
    (pss, guest)
}

#[test]
fn fifty_idle_guests_boot_at_once_and_cost_little() {
    let s = Scratch::new("density");
    let run_dir = s.0.join("run");
    let _reaper = Reaper(run_dir.clone());
    let cmd = "echo UP; sleep 1000000";
    let start = Instant::now();
    let launches: Vec<_> = (0..GUESTS)
        .map(|i| {
            // Without no_timer_check: the kernel's timer check must pass
            // on a busy host (issue 14, hole 11).
            detached_with_cmdline(
                &run_dir,
                &format!("g{i}"),
                "kernel/vmlinux",
                "64M",
                &format!("console=ttyS0 reboot=k panic=-1 vessel.cmd={}", b64(cmd)),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for (i, l) in launches.into_iter().enumerate() {
        let o = l.wait_with_output().unwrap();
        assert!(o.status.success(), "g{i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let started = start.elapsed();
    let log = |i: usize| std::fs::read_to_string(run_dir.join(format!("g{i}")).join("console.log")).unwrap_or_default();
    let mut up = [false; GUESTS];
    while up.iter().any(|u| !u) {
        for (i, u) in up.iter_mut().enumerate() {
            if !*u {
                let l = log(i);
                assert!(
                    !l.contains("Kernel panic") && !l.contains("IO-APIC + timer doesn't work"),
                    "g{i} panicked:\n{l}"
                );
                *u = l.lines().any(|x| x.trim_end() == "UP");
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "{} of {GUESTS} guests booted within 900 s",
            up.iter().filter(|u| **u).count()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let booted = start.elapsed();
    let pids: Vec<i32> = (0..GUESTS)
        .map(|i| {
            std::fs::read_to_string(run_dir.join(format!("g{i}")).join("pid"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    // Let the last boots' work (and the host's) settle, then measure.
    std::thread::sleep(Duration::from_secs(5));
    let window = Duration::from_secs(10);
    let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    std::thread::sleep(window);
    let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    // SAFETY: sysconf with a valid name; no memory is touched.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cores = (after - before) as f64 / hz / window.as_secs_f64();
    let mut own: Vec<u64> = pids
        .iter()
        .map(|&p| {
            let (pss, guest) = memory_kb(p);
            pss.saturating_sub(guest)
        })
        .collect();
    own.sort_unstable();
    eprintln!(
        "density: {GUESTS} guests launched in {started:?}, all booted in {booted:?}; idle CPU {cores:.3} cores \
         together ({:.4} per guest); VMM memory per guest (PSS minus guest RAM) median {} KiB, max {} KiB",
        cores / GUESTS as f64,
        own[GUESTS / 2],
        own[GUESTS - 1]
    );
    assert!(cores < 0.5, "{GUESTS} idle guests use {cores:.2} cores");
    // Firecracker's published bound on the VMM's own memory per VM.
    assert!(
        own[GUESTS / 2] <= 5 * 1024,
        "the VMM's own memory per idle guest is {} KiB (median), over 5 MiB",
        own[GUESTS / 2]
    );
    for i in 0..GUESTS {
        let l = log(i);
        assert!(!l.contains("soft lockup") && !l.contains("Oops"), "g{i}:\n{l}");
    }
}
