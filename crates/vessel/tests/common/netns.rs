//! A network namespace with a persistent TAP, for the tests that move a
//! guest's network between VMMs (migration, failover).

use std::process::Stdio;

use super::TimedOutput;

/// `ip ARGS`, which must succeed (the network tests need root and iproute2).
pub fn ip(args: &[&str]) {
    let o = std::process::Command::new("ip")
        .args(args)
        .timed_output()
        .expect("ip (iproute2) is needed for this test");
    assert!(
        o.status.success(),
        "ip {args:?}: {} (this test needs root: CAP_NET_ADMIN for the namespace and the tap)",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A network namespace holding one persistent TAP with the host's end of
/// a /24, removed when dropped.
pub struct NetNs(String);

impl NetNs {
    pub fn new(tag: &str, tap: &str, host_ip: &str) -> NetNs {
        let name = format!("vessel-{tag}-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .timed_output();
        ip(&["netns", "add", &name]);
        let ns = NetNs(name.clone());
        ip(&["-n", &name, "tuntap", "add", tap, "mode", "tap"]);
        ip(&["-n", &name, "addr", "add", host_ip, "dev", tap]);
        ip(&["-n", &name, "link", "set", tap, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ns
    }

    /// Run `f` on a thread inside the namespace (its sockets live there).
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            use std::os::unix::io::AsRawFd;
            // SAFETY: setns on a namespace fd we opened; it changes only
            // this thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// `c` (a `vessel` command) run inside the namespace.
    pub fn wrap(&self, c: &std::process::Command) -> std::process::Command {
        let mut n = std::process::Command::new("ip");
        n.args(["netns", "exec", &self.0])
            .arg(c.get_program())
            .args(c.get_args());
        for (k, v) in c.get_envs() {
            if let Some(v) = v {
                n.env(k, v);
            }
        }
        n.stdin(Stdio::null());
        n
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .timed_output();
    }
}
