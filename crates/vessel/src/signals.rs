//! Signals as requests: SIGUSR1 pauses the VM, SIGUSR2 resumes it, SIGTERM
//! and SIGINT stop it cleanly. A thread waits for them with sigwait and
//! hands them to the VMM's main loop, like any other request.

use std::sync::mpsc::Sender;

use crate::control::Msg;

const SIGNALS: [libc::c_int; 4] = [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block the signals in this thread and the threads it starts later, so
/// only the signal thread's sigwait receives them. Call before starting
/// any thread.
pub fn block() {
    let set = signal_set();
    // SAFETY: the set is initialised; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Forward each signal to the main loop.
pub fn spawn(tx: Sender<Msg>) {
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let set = signal_set();
        let mut sig: libc::c_int = 0;
        // SAFETY: both pointers are to initialised locals.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        if tx.send(Msg::Signal(sig)).is_err() {
            return;
        }
    });
}
