//! A TAP interface: Ethernet frames to and from the host's network stack.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

// From <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attach to the TAP interface `name`, creating it when it does not
    /// exist (that needs CAP_NET_ADMIN). `None` lets the kernel pick a name.
    pub fn open(name: Option<&str>) -> io::Result<Tap> {
        let want = name.unwrap_or("vessel%d");
        if want.is_empty() || want.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..want.len()].copy_from_slice(want.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
        // `IfReq` lays out (name, flags, padding to 40 bytes); `req` lives
        // across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::EPERM) {
                " (creating a tap needs CAP_NET_ADMIN; or create it first with `ip tuntap add NAME mode tap`)"
            } else {
                ""
            };
            return Err(io::Error::new(e.kind(), format!("tap {want}: {e}{hint}")));
        }
        let name = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| want.to_string());
        Ok(Tap { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A second handle on the same interface (a duplicated descriptor).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Read one frame; `WouldBlock` when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// With CAP_NET_ADMIN Vessel creates the tap itself; it goes away with
    /// the device. Without CAP_NET_ADMIN the test fails, saying so.
    #[test]
    fn creates_a_tap_when_permitted() {
        match Tap::open(Some("vsltest%d")) {
            Ok(tap) => {
                let name = tap.name().to_string();
                assert!(name.starts_with("vsltest") && !name.contains('%'), "{name}");
                assert!(Path::new("/sys/class/net").join(&name).exists());
                drop(tap);
                assert!(!Path::new("/sys/class/net").join(&name).exists());
            }
            // A test that cannot run fails (team rule): CI runs as root.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                panic!("this test needs CAP_NET_ADMIN (run it as root): {e}")
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(Tap::open(Some("")).is_err());
        assert!(Tap::open(Some("a-name-longer-than-15")).is_err());
    }
}
