//! The terminal side of the serial console: raw mode while the guest runs,
//! and keyboard input forwarded to the guest, with Ctrl-A x to quit (as in
//! QEMU; Ctrl-A Ctrl-A sends a literal Ctrl-A).

use std::io::Read;

use vmm::machine::ConsoleInput;

const CTRL_A: u8 = 0x01;

/// Puts a terminal in raw mode and restores it when dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on standard input if it is a terminal.
    pub fn enable() -> Option<RawMode> {
        // SAFETY: isatty only inspects the file descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios for the duration of the call.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        // SAFETY: cfmakeraw only modifies the struct we pass.
        unsafe { libc::cfmakeraw(&mut t) };
        // Keep output post-processing so host-side messages stay readable.
        t.c_oflag |= libc::OPOST;
        // SAFETY: valid termios pointer; fd 0 is a terminal.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            return None;
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved from the same descriptor.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// What the escape filter decided for one input byte.
#[derive(Debug, PartialEq, Eq)]
pub enum Key {
    Send(u8),
    Quit,
    Nothing,
}

/// Ctrl-A escape handling, one byte at a time: Ctrl-A then the quit key
/// (x in `vessel run`, d to detach in `vessel console`).
pub struct Escape {
    pending: bool,
    quit_key: u8,
}

impl Default for Escape {
    fn default() -> Self {
        Escape {
            pending: false,
            quit_key: b'x',
        }
    }
}

/// The terminal's saved mode while the process holds it raw.
static RAW: std::sync::Mutex<Option<RawMode>> = std::sync::Mutex::new(None);

/// Put the terminal (if stdin is one) in raw mode until [`leave_raw`].
pub fn enter_raw() {
    let mut r = RAW.lock().unwrap_or_else(|e| e.into_inner());
    if r.is_none() {
        *r = RawMode::enable();
    }
}

/// Restore the terminal's mode saved by [`enter_raw`].
pub fn leave_raw() {
    RAW.lock().unwrap_or_else(|e| e.into_inner()).take();
}

impl Escape {
    /// Ctrl-A d ends the session (`vessel console`: detach).
    pub fn detach_key() -> Self {
        Escape {
            pending: false,
            quit_key: b'd',
        }
    }

    pub fn feed(&mut self, b: u8) -> Key {
        if self.pending {
            self.pending = false;
            return match b {
                k if k.eq_ignore_ascii_case(&self.quit_key) => Key::Quit,
                CTRL_A => Key::Send(CTRL_A),
                _ => Key::Nothing,
            };
        }
        if b == CTRL_A {
            self.pending = true;
            Key::Nothing
        } else {
            Key::Send(b)
        }
    }
}

/// Forward standard input to the guest until EOF or Ctrl-A x.
pub fn spawn_input(input: ConsoleInput) {
    std::thread::spawn(move || {
        vmm::seccomp::enter(vmm::seccomp::ThreadKind::Console);
        let mut esc = Escape::default();
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut out = Vec::with_capacity(n);
            for &b in &buf[..n] {
                match esc.feed(b) {
                    Key::Send(c) => out.push(c),
                    Key::Quit => {
                        input.quit();
                        return;
                    }
                    Key::Nothing => {}
                }
            }
            if !out.is_empty() && input.send(&out) < out.len() {
                return; // the VM stopped
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut e = Escape::default();
        assert_eq!(e.feed(b'a'), Key::Send(b'a'));
        assert_eq!(e.feed(CTRL_A), Key::Nothing);
        assert_eq!(e.feed(CTRL_A), Key::Send(CTRL_A));
        assert_eq!(e.feed(CTRL_A), Key::Nothing);
        assert_eq!(e.feed(b'x'), Key::Quit);
        assert_eq!(e.feed(CTRL_A), Key::Nothing);
        assert_eq!(e.feed(b'q'), Key::Nothing);
        assert_eq!(e.feed(b'x'), Key::Send(b'x'));
        let mut d = Escape::detach_key();
        assert_eq!(d.feed(CTRL_A), Key::Nothing);
        assert_eq!(d.feed(b'x'), Key::Nothing);
        assert_eq!(d.feed(CTRL_A), Key::Nothing);
        assert_eq!(d.feed(b'd'), Key::Quit);
    }
}
