//! The serial console of a VM shared between its outputs (the terminal,
//! the console log of a named VM, and every `vessel console` attached to
//! its console socket) and its inputs (the terminal and attached consoles).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long an attached console may block the guest's output before it is
/// dropped (the log keeps everything).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Outputs {
    stdout: bool,
    log: Option<std::fs::File>,
    clients: Vec<UnixStream>,
}

/// Fan-out of the guest's serial output.
#[derive(Clone, Default)]
pub struct ConsoleHub {
    out: Arc<Mutex<Outputs>>,
}

impl ConsoleHub {
    pub fn new(stdout: bool, log: Option<&Path>) -> std::io::Result<Self> {
        let log = match log {
            Some(p) => Some(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
            None => None,
        };
        Ok(ConsoleHub {
            out: Arc::new(Mutex::new(Outputs {
                stdout,
                log,
                clients: Vec::new(),
            })),
        })
    }

    /// A writer for the serial port.
    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(HubWriter { hub: self.clone() })
    }

    /// Serve `vessel console` clients on `sock`: each sees the output from
    /// now on, and what it sends is the guest's input.
    pub fn serve(&self, sock: &Path, input: vmm::machine::ConsoleInput) -> std::io::Result<()> {
        let _ = std::fs::remove_file(sock);
        let listener = UnixListener::bind(sock)?;
        let hub = self.clone();
        std::thread::Builder::new().name("console".into()).spawn(move || {
            vmm::seccomp::enter(vmm::seccomp::ThreadKind::Console);
            for stream in listener.incoming().flatten() {
                let Ok(reader) = stream.try_clone() else { continue };
                let _ = stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
                hub.out.lock().unwrap_or_else(|e| e.into_inner()).clients.push(stream);
                let input = input.clone();
                let _ = std::thread::Builder::new().name("console-in".into()).spawn(move || {
                    let mut reader = reader;
                    let mut buf = [0u8; 4096];
                    loop {
                        match reader.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                // Blocks while the guest drains its FIFO: no input is lost.
                                if input.send(&buf[..n]) < n {
                                    return; // the VM stopped
                                }
                            }
                        }
                    }
                });
            }
        })?;
        Ok(())
    }
}

struct HubWriter {
    hub: ConsoleHub,
}

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut o = self.hub.out.lock().unwrap_or_else(|e| e.into_inner());
        if o.stdout {
            let mut s = std::io::stdout().lock();
            let _ = s.write_all(buf);
            let _ = s.flush();
        }
        if let Some(log) = o.log.as_mut() {
            let _ = log.write_all(buf);
        }
        // A client that cannot take the bytes in time is dropped.
        o.clients.retain_mut(|c| c.write_all(buf).is_ok());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
