//! Pause and resume from outside: SIGUSR1 pauses the VM (every vCPU out of
//! guest code), SIGUSR2 resumes it. Each prints one line on stderr. A
//! stand-in for the HTTP API's pause/resume until that exists.

use std::time::Duration;

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        set
    }
}

/// Block SIGUSR1/SIGUSR2 in this thread (and the threads it starts later),
/// so only the control thread's sigwait receives them. Call before the
/// machine starts its vCPU threads.
pub fn block_signals() {
    let set = signal_set();
    // SAFETY: the set is initialised; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Serve SIGUSR1 (pause) and SIGUSR2 (resume) for `vm`.
pub fn spawn(vm: vmm::VmHandle) {
    std::thread::spawn(move || loop {
        let set = signal_set();
        let mut sig: libc::c_int = 0;
        // SAFETY: both pointers are to initialised locals.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        match sig {
            libc::SIGUSR1 => {
                if vm.pause(Duration::from_secs(5)) {
                    let states = vm.vcpu_states();
                    let rips: Vec<String> = states
                        .iter()
                        .enumerate()
                        .map(|(i, s)| match s {
                            Some(s) => format!("vcpu{i} rip={:#x}", s.rip),
                            None => format!("vcpu{i} state unreadable"),
                        })
                        .collect();
                    eprintln!("vessel: paused (every vCPU out of the guest; {})", rips.join(", "));
                } else {
                    eprintln!("vessel: pause requested, but not every vCPU stopped within 5 s");
                }
            }
            libc::SIGUSR2 => {
                vm.resume();
                eprintln!("vessel: resumed");
            }
            _ => {}
        }
    });
}
