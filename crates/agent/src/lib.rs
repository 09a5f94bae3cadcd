//! The wire protocol between `vessel exec` (host) and the guest agent,
//! over one vsock stream: frames of a kind byte, a u32 LE length and the
//! payload.
//!
//! Host to agent: [`RUN`] once (argv, env, cwd), then [`STDIN`] data,
//! [`STDIN_EOF`], and [`SIGNAL`] (u32 LE signal number) in any order.
//! Agent to host: [`STDOUT`] and [`STDERR`] data, then [`EXIT`] (i32 LE:
//! the exit code, or 128 + the signal that killed it) or [`FAILED`] (a
//! message: the command could not start).

use std::io::{self, Read, Write};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;

pub const RUN: u8 = b'R';
pub const STDIN: u8 = b'I';
pub const STDIN_EOF: u8 = b'i';
pub const SIGNAL: u8 = b'S';
pub const STDOUT: u8 = b'O';
pub const STDERR: u8 = b'E';
pub const EXIT: u8 = b'X';
pub const FAILED: u8 = b'F';

/// The largest frame accepted: a peer cannot make us allocate more.
pub const MAX_FRAME: usize = 1 << 20;

pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&head);
    buf.extend_from_slice(payload);
    w.write_all(&buf)
}

/// The next frame, or `None` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..])?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// What to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub argv: Vec<String>,
    /// `KEY=VALUE`, added to the agent's environment.
    pub env: Vec<String>,
    pub cwd: Option<String>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn take_str(b: &mut &[u8]) -> Option<String> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let s = b.get(4..4usize.checked_add(len)?)?;
    let s = String::from_utf8(s.to_vec()).ok()?;
    *b = &b[4 + len..];
    Some(s)
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.argv.len() as u32).to_le_bytes());
        self.argv.iter().for_each(|a| put_str(&mut out, a));
        out.extend_from_slice(&(self.env.len() as u32).to_le_bytes());
        self.env.iter().for_each(|a| put_str(&mut out, a));
        put_str(&mut out, self.cwd.as_deref().unwrap_or(""));
        out
    }

    pub fn decode(mut b: &[u8]) -> Option<Request> {
        let list = |b: &mut &[u8]| -> Option<Vec<String>> {
            let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
            *b = &b[4..];
            // Each string takes at least 4 bytes: a bogus count fails here.
            if n > b.len() / 4 {
                return None;
            }
            (0..n).map(|_| take_str(b)).collect()
        };
        let argv = list(&mut b)?;
        let env = list(&mut b)?;
        let cwd = take_str(&mut b)?;
        (!argv.is_empty() && b.is_empty()).then_some(Request {
            argv,
            env,
            cwd: (!cwd.is_empty()).then_some(cwd),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let r = Request {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["A=b".into()],
            cwd: Some("/tmp".into()),
        };
        assert_eq!(Request::decode(&r.encode()), Some(r.clone()));
        let e = r.encode();
        for cut in 0..e.len() {
            assert_eq!(Request::decode(&e[..cut]), None);
        }
        assert_eq!(Request::decode(&[0xff; 16]), None);
        let mut wire = Vec::new();
        write_frame(&mut wire, RUN, &e).unwrap();
        let mut r2 = &wire[..];
        assert_eq!(read_frame(&mut r2).unwrap(), Some((RUN, e)));
        assert_eq!(read_frame(&mut r2).unwrap(), None);
        let huge = [STDIN, 0xff, 0xff, 0xff, 0x7f];
        assert!(read_frame(&mut &huge[..]).is_err());
    }
}
