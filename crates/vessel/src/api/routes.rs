//! From an HTTP request (method, path, body) to a [`VmmAction`], with
//! Firecracker's paths and bodies. Pure: no I/O, so it can be fuzzed.

use serde::de::DeserializeOwned;

use crate::control::VmmAction;
use crate::fc;

/// Why a request could not become an action; answered with 400.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

fn body<T: DeserializeOwned>(body: &[u8]) -> Result<T, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError(
            "empty request body: this request needs a JSON body".into(),
        ));
    }
    // Only an object is a body: serde would also take a struct from an array.
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| RequestError(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(RequestError("invalid JSON body: expected an object".into()));
    }
    serde_json::from_value(value).map_err(|e| RequestError(format!("invalid JSON body: {e}")))
}

fn same_id(path_id: &str, body_id: &str) -> Result<(), RequestError> {
    if path_id != body_id {
        return Err(RequestError(format!(
            "the id in the path ({path_id:?}) does not match the id in the body ({body_id:?})"
        )));
    }
    fc::check_id("id", path_id).map_err(RequestError)
}

/// The action for `method path` with `body`.
pub fn parse(method: &str, path: &str, body_bytes: &[u8]) -> Result<VmmAction, RequestError> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let b = body_bytes;
    let action = match (method, parts.as_slice()) {
        ("GET", []) => VmmAction::GetInstanceInfo,
        ("GET", ["version"]) => VmmAction::GetVersion,
        ("GET", ["vm", "config"]) => VmmAction::GetFullConfig,
        ("GET", ["machine-config"]) => VmmAction::GetMachineConfig,
        ("PUT", ["machine-config"]) => VmmAction::PutMachineConfig(body(b)?),
        ("PATCH", ["machine-config"]) => VmmAction::PatchMachineConfig(body(b)?),
        ("PUT", ["boot-source"]) => VmmAction::PutBootSource(body(b)?),
        ("PUT", ["drives", id]) => {
            let d: fc::Drive = body(b)?;
            same_id(id, &d.drive_id)?;
            VmmAction::PutDrive(d)
        }
        ("PATCH", ["drives", id]) => {
            let d: fc::DriveUpdate = body(b)?;
            same_id(id, &d.drive_id)?;
            VmmAction::PatchDrive(d)
        }
        ("PUT", ["network-interfaces", id]) => {
            let n: fc::NetworkInterface = body(b)?;
            same_id(id, &n.iface_id)?;
            VmmAction::PutNetworkInterface(n)
        }
        ("PATCH", ["network-interfaces", id]) => {
            let n: fc::NetworkInterfaceUpdate = body(b)?;
            same_id(id, &n.iface_id)?;
            VmmAction::PatchNetworkInterface(n)
        }
        ("PUT", ["entropy"]) => VmmAction::PutEntropy(body(b)?),
        ("PUT", ["vsock"]) => VmmAction::PutVsock(body(b)?),
        ("PUT", ["logger"]) => VmmAction::PutLogger(body(b)?),
        ("PUT", ["metrics"]) => VmmAction::PutMetrics(body(b)?),
        ("PUT", ["serial"]) => VmmAction::PutSerial(body(b)?),
        ("PUT", ["actions"]) => {
            let a: fc::InstanceActionInfo = body(b)?;
            match a.action_type.as_str() {
                "InstanceStart" => VmmAction::InstanceStart,
                "SendCtrlAltDel" => VmmAction::SendCtrlAltDel,
                "FlushMetrics" => VmmAction::FlushMetrics,
                other => {
                    return Err(RequestError(format!(
                        "action_type {other:?} must be InstanceStart, SendCtrlAltDel or FlushMetrics"
                    )))
                }
            }
        }
        ("PUT", ["snapshot", "create"]) => VmmAction::CreateSnapshot(body(b)?),
        ("PUT", ["snapshot", "load"]) => VmmAction::LoadSnapshot(body(b)?),
        ("PUT", ["migration", "receive"]) => VmmAction::MigrationReceive(body(b)?),
        ("PUT", ["migration", "send"]) => VmmAction::MigrationSend(body(b)?),
        ("GET", ["migration"]) => VmmAction::GetMigration,
        ("PUT", ["migration", "cancel"]) => VmmAction::CancelMigration,
        ("PUT", ["failover", "standby"]) => VmmAction::FailoverStandby(body(b)?),
        ("PUT", ["failover", "protect"]) => VmmAction::FailoverProtect(body(b)?),
        ("GET", ["failover"]) => VmmAction::GetFailover,
        ("PUT", ["failover", "takeover"]) => VmmAction::FailoverTakeover,
        ("PATCH", ["vm"]) => {
            let s: fc::VmStateRequest = body(b)?;
            match s.state.as_str() {
                "Paused" => VmmAction::Pause,
                "Resumed" => VmmAction::Resume,
                other => return Err(RequestError(format!("state {other:?} must be Paused or Resumed"))),
            }
        }
        _ => {
            return Err(RequestError(format!(
                "invalid request method and/or path: {method} {}",
                path.escape_debug()
            )))
        }
    };
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_requests() {
        assert_eq!(parse("GET", "/", b"").unwrap(), VmmAction::GetInstanceInfo);
        assert_eq!(parse("GET", "/vm/config", b"").unwrap(), VmmAction::GetFullConfig);
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#).unwrap(),
            VmmAction::InstanceStart
        );
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state": "Paused"}"#).unwrap(),
            VmmAction::Pause
        );
        let d = parse(
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, "is_read_only": false}"#,
        )
        .unwrap();
        assert!(matches!(d, VmmAction::PutDrive(ref d) if d.drive_id == "rootfs"));
        assert!(matches!(
            parse("PUT", "/machine-config", br#"{"vcpu_count": 2, "mem_size_mib": 1024}"#).unwrap(),
            VmmAction::PutMachineConfig(_)
        ));
        assert_eq!(parse("GET", "/migration", b"").unwrap(), VmmAction::GetMigration);
        assert_eq!(
            parse("PUT", "/migration/cancel", b"").unwrap(),
            VmmAction::CancelMigration
        );
        assert!(matches!(
            parse("PUT", "/migration/send", br#"{"destination_url": "unix:/m", "mode": "cold"}"#).unwrap(),
            VmmAction::MigrationSend(ref r) if r.destination_url == "unix:/m"
        ));
        assert!(matches!(
            parse("PUT", "/migration/receive", br#"{"receiver_url": "tcp:0.0.0.0:4444"}"#).unwrap(),
            VmmAction::MigrationReceive(_)
        ));
        assert_eq!(parse("GET", "/failover", b"").unwrap(), VmmAction::GetFailover);
        assert_eq!(
            parse("PUT", "/failover/takeover", b"").unwrap(),
            VmmAction::FailoverTakeover
        );
        assert!(matches!(
            parse("PUT", "/failover/protect", br#"{"standby_url": "tcp:h:1", "epoch_ms": 25}"#).unwrap(),
            VmmAction::FailoverProtect(ref r) if r.epoch_ms == 25 && r.timeout_ms == 500
        ));
        assert!(matches!(
            parse(
                "PUT",
                "/failover/standby",
                br#"{"listen_url": "tcp:0.0.0.0:4445", "takeover": "manual"}"#
            )
            .unwrap(),
            VmmAction::FailoverStandby(_)
        ));
    }

    #[test]
    fn bad_requests() {
        for (m, p, b) in [
            ("GET", "/nope", &b""[..]),
            ("DELETE", "/", b""),
            ("POST", "/actions", br#"{"action_type": "InstanceStart"}"#),
            ("PUT", "/actions", b""),
            ("PUT", "/actions", b"{"),
            ("PUT", "/machine-config", b"[1, 2]"),
            ("PUT", "/actions", br#"{"action_type": "Explode"}"#),
            ("PUT", "/actions", br#"{"action_type": "InstanceStart", "extra": 1}"#),
            (
                "PUT",
                "/drives/a",
                br#"{"drive_id": "b", "path_on_host": "/r", "is_root_device": false}"#,
            ),
            (
                "PUT",
                "/drives/a%2F",
                br#"{"drive_id": "a%2F", "path_on_host": "/r", "is_root_device": false}"#,
            ),
            ("PATCH", "/vm", br#"{"state": "Running"}"#),
            ("PUT", "/machine-config", br#"{"vcpu_count": "two", "mem_size_mib": 1}"#),
            ("GET", "/drives/a/b", b""),
            ("PUT", "/snapshot/create", b"{}"),
            ("PUT", "/snapshot/load", br#"{"snapshot_path": "/s", "bogus": 1}"#),
            ("PUT", "/migration/send", b"{}"),
            (
                "PUT",
                "/migration/send",
                br#"{"destination_url": "tcp:h:1", "mode": "warm"}"#,
            ),
            ("PUT", "/migration/receive", br#"{"receiver_url": 5}"#),
            ("POST", "/migration", b""),
            ("PUT", "/failover/protect", b"{}"),
            (
                "PUT",
                "/failover/standby",
                br#"{"listen_url": "unix:/s", "takeover": "later"}"#,
            ),
            ("POST", "/failover", b""),
        ] {
            assert!(parse(m, p, b).is_err(), "{m} {p} accepted");
        }
    }
}
