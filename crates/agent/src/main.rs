//! `vessel-agent`: runs in the guest. Subcommands:
//! - `serve [PORT]`: the agent for `vessel exec` (protocol in the library).
//! - `echo PORT`: a vsock echo server (tests: host-to-guest connections).
//! - `connect CID PORT`: stdin to a vsock connection, the connection to
//!   stdout (tests: guest-to-host connections).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use vessel_agent::*;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> io::Result<File> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn listen(port: u32) -> io::Result<File> {
    let s = vsock_socket()?;
    let a = vsock_addr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `a` is a valid sockaddr_vm of `len` bytes, alive across the call.
    check(unsafe { libc::bind(s.as_raw_fd(), (&a as *const libc::sockaddr_vm).cast(), len) })?;
    // SAFETY: no pointers.
    check(unsafe { libc::listen(s.as_raw_fd(), 128) })?;
    Ok(s)
}

fn accept(l: &File) -> io::Result<File> {
    loop {
        // SAFETY: null address pointers are allowed (the peer is not asked for).
        let fd = unsafe {
            libc::accept4(
                l.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a new descriptor that nothing else owns.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn connect(cid: u32, port: u32) -> io::Result<File> {
    let s = vsock_socket()?;
    let a = vsock_addr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `a` is a valid sockaddr_vm of `len` bytes, alive across the call.
    check(unsafe { libc::connect(s.as_raw_fd(), (&a as *const libc::sockaddr_vm).cast(), len) })?;
    Ok(s)
}

fn shutdown(f: &File, how: libc::c_int) {
    // SAFETY: no pointers; a bad descriptor only gives an error.
    unsafe { libc::shutdown(f.as_raw_fd(), how) };
}

/// Copy `from` to `to` until EOF.
fn pump(mut from: impl Read, mut to: impl Write) -> io::Result<u64> {
    io::copy(&mut from, &mut to)
}

fn echo(port: u32) -> io::Result<()> {
    let l = listen(port)?;
    println!("vessel-agent: echo on vsock port {port}");
    loop {
        let c = accept(&l)?;
        std::thread::spawn(move || {
            let r = c.try_clone().expect("dup");
            let _ = pump(r, &c);
            shutdown(&c, libc::SHUT_WR);
        });
    }
}

fn connect_cmd(cid: u32, port: u32) -> io::Result<()> {
    let c = connect(cid, port)?;
    let w = c.try_clone()?;
    let sender = std::thread::spawn(move || {
        let _ = pump(io::stdin(), &w);
        shutdown(&w, libc::SHUT_WR);
    });
    pump(&c, io::stdout())?;
    drop(sender);
    Ok(())
}

fn serve(port: u32) -> io::Result<()> {
    let l = listen(port)?;
    loop {
        let c = accept(&l)?;
        std::thread::spawn(move || {
            if let Err(e) = run_one(c) {
                eprintln!("vessel-agent: {e}");
            }
        });
    }
}

/// One `vessel exec`: the request, the streams, the status.
fn run_one(conn: File) -> io::Result<()> {
    let mut reader = conn.try_clone()?;
    let writer = Arc::new(Mutex::new(conn));
    let send = |kind: u8, data: &[u8]| -> io::Result<()> {
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *w, kind, data)
    };
    let req = match read_frame(&mut reader)? {
        Some((RUN, p)) => Request::decode(&p).ok_or_else(|| io::Error::other("malformed request"))?,
        _ => return Err(io::Error::other("expected a request")),
    };
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for kv in &req.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    if let Some(d) = &req.cwd {
        cmd.current_dir(d);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            send(FAILED, format!("{}: {e}", req.argv[0]).as_bytes())?;
            shutdown(&writer.lock().unwrap_or_else(|e| e.into_inner()), libc::SHUT_RDWR);
            return Ok(());
        }
    };
    let pid = child.id() as libc::pid_t;
    let mut stdin = child.stdin.take();
    let outputs: Vec<_> = [
        (STDOUT, child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>)),
        (STDERR, child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>)),
    ]
    .into_iter()
    .filter_map(|(kind, s)| s.map(|s| (kind, s)))
    .map(|(kind, mut s)| {
        let writer = writer.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                        if write_frame(&mut *w, kind, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    })
    .collect();
    // Input from the host: stdin, its end, signals. The host going away
    // kills the command.
    std::thread::spawn(move || loop {
        match read_frame(&mut reader) {
            Ok(Some((STDIN, data))) => {
                if let Some(s) = stdin.as_mut() {
                    if s.write_all(&data).is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Some((STDIN_EOF, _))) => stdin = None,
            Ok(Some((SIGNAL, p))) if p.len() == 4 => {
                let sig = i32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                // SAFETY: no pointers; a bad signal number gives EINVAL.
                unsafe { libc::kill(pid, sig) };
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                // SAFETY: no pointers. The child may be gone already (ESRCH),
                // but not reaped, so its pid is not reused meanwhile.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return;
            }
        }
    });
    let status = child.wait()?;
    for t in outputs {
        let _ = t.join();
    }
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    send(EXIT, &code.to_le_bytes())?;
    shutdown(&writer.lock().unwrap_or_else(|e| e.into_inner()), libc::SHUT_RDWR);
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, what: &str| -> u32 {
        args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            eprintln!("vessel-agent: {what} must be a number");
            std::process::exit(2)
        })
    };
    let r = match args.get(1).map(String::as_str) {
        Some("serve") => serve(if args.len() > 2 { num(2, "PORT") } else { AGENT_PORT }),
        Some("echo") => echo(num(2, "PORT")),
        Some("connect") => connect_cmd(num(2, "CID"), num(3, "PORT")),
        _ => {
            eprintln!("usage: vessel-agent serve [PORT] | echo PORT | connect CID PORT");
            std::process::exit(2)
        }
    };
    if let Err(e) = r {
        eprintln!("vessel-agent: {e}");
        std::process::exit(1);
    }
}
