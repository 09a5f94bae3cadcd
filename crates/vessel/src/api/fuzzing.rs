//! The fuzzing entry point for the API: a sequence of requests, each
//! parsed as the server does and dispatched to a controller of a VM that
//! has not started. Requests whose effect reaches outside the process
//! (InstanceStart, which maps memory and opens images; logger, metrics and
//! serial, which create files at the given paths) are parsed but not run.
//! Also run over a fixed corpus by a unit test.

use crate::control::{ConsoleWiring, Controller, VmState, VmmAction};
use crate::metrics::MetricsSink;

const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD"];

/// `data`: requests separated by 0xff bytes; in each, the first byte picks
/// the method, the path runs to the first '\n', and the rest is the body.
pub fn requests(data: &[u8]) {
    let (tx, _rx) = std::sync::mpsc::channel();
    let wiring = ConsoleWiring {
        default_output: Box::new(|| Box::new(std::io::sink())),
        on_start: Box::new(|_| {}),
    };
    let mut ctl = Controller::new("fuzz".into(), wiring, tx, MetricsSink::default());
    for req in data.split(|&b| b == 0xff).take(64) {
        let Some((&m, rest)) = req.split_first() else { continue };
        let method = METHODS[m as usize % METHODS.len()];
        let (path, body) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let Ok(path) = std::str::from_utf8(path) else { continue };
        let Ok(action) = super::routes::parse(method, path, body) else {
            continue;
        };
        let before = ctl.full_config();
        let touches_host = matches!(
            action,
            VmmAction::InstanceStart | VmmAction::PutLogger(_) | VmmAction::PutMetrics(_) | VmmAction::PutSerial(_)
        );
        if touches_host {
            continue;
        }
        if ctl.handle(action).is_err() {
            assert_eq!(ctl.full_config(), before, "a refused request changed the configuration");
        }
        assert_eq!(ctl.state(), VmState::NotStarted);
        // Everything a client can read back must serialize.
        let _ = serde_json::to_string(&ctl.full_config()).expect("config serializes");
        let _ = serde_json::to_string(&ctl.instance_info()).expect("info serializes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus() {
        let mut seeds: Vec<Vec<u8>> = vec![
            b"\x01/machine-config\n{\"vcpu_count\": 2, \"mem_size_mib\": 64}".to_vec(),
            b"\x01/drives/a\n{\"drive_id\": \"a\", \"path_on_host\": \"/x\", \"is_root_device\": true}\xff\x02/drives/a\n{\"drive_id\": \"a\", \"path_on_host\": \"\"}".to_vec(),
            b"\x02/machine-config\n{\"vcpu_count\": 0}\xff\x00/vm/config\n".to_vec(),
            b"\x01/network-interfaces/e\n{\"iface_id\": \"e\", \"host_dev_name\": \"tap0\", \"guest_mac\": \"zz\"}".to_vec(),
            b"\x02/vm\n{\"state\": \"Paused\"}\xff\x01/actions\n{\"action_type\": \"SendCtrlAltDel\"}".to_vec(),
        ];
        // Deterministic mutations of the seeds.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..3000 {
            let mut s = seeds[i % 5].clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let pos = (x as usize) % s.len().max(1);
                if !s.is_empty() {
                    s[pos] = (x >> 32) as u8;
                }
            }
            seeds.push(s);
        }
        for s in &seeds {
            requests(s);
        }
    }
}
