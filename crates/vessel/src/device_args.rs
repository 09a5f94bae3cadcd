//! Device options on the command line and in the machine file:
//! `--disk path=IMG[,readonly=on][,format=raw|qcow2]` and `--net [tap=NAME][,mac=MAC]`.

use std::path::PathBuf;

use disk::ImageFormat;
use serde::{Deserialize, Deserializer};
use vmm::machine::{DiskConfig, NetConfig};

/// Split "k=v,k=v" into pairs; a bare first item is the value of `bare`.
fn pairs<'a>(s: &'a str, bare: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    s.split(',')
        .enumerate()
        .map(|(i, item)| match item.split_once('=') {
            Some((k, v)) => Ok((k.trim(), v.trim())),
            None if i == 0 && !item.is_empty() => Ok((bare, item)),
            None => Err(format!("'{item}' in '{s}' is not key=value")),
        })
        .collect()
}

fn parse_switch(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let mut read_only = false;
    let mut allow_absolute_backing = false;
    let mut format = None;
    for (k, v) in pairs(s, "path")? {
        match k {
            "path" => path = Some(PathBuf::from(v)),
            "format" => format = Some(parse_format(v)?),
            "readonly" | "ro" => read_only = parse_switch(k, v)?,
            "allow-absolute-backing" => allow_absolute_backing = parse_switch(k, v)?,
            _ => {
                return Err(format!(
                    "--disk: unknown option '{k}' (known: path, readonly, format, allow-absolute-backing)"
                ))
            }
        }
    }
    let path = path.ok_or_else(|| format!("--disk {s}: no path= given"))?;
    Ok(DiskConfig {
        path,
        read_only,
        allow_absolute_backing,
        format,
    })
}

/// `format=raw|qcow2`.
pub fn parse_format(v: &str) -> Result<ImageFormat, String> {
    v.parse::<ImageFormat>().map_err(|e| format!("format={v}: {e}"))
}

fn de_format<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ImageFormat>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| parse_format(&s).map_err(serde::de::Error::custom))
        .transpose()
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("mac={s}: expected six hex bytes like 52:54:00:12:34:56"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("mac={s}: '{p}' is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac={s}: a multicast address cannot name a NIC"));
    }
    Ok(mac)
}

pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut net = NetConfig::default();
    if s.is_empty() {
        return Ok(net);
    }
    for (k, v) in pairs(s, "tap")? {
        match k {
            "tap" => {
                if v.is_empty() || v.len() > 15 || v.contains('/') {
                    return Err(format!("tap={v}: an interface name is 1 to 15 characters"));
                }
                net.tap = Some(v.to_string());
            }
            "mac" => net.mac = Some(parse_mac(v)?),
            _ => return Err(format!("--net: unknown option '{k}' (known: tap, mac)")),
        }
    }
    Ok(net)
}

/// `--vsock cid=N,uds=PATH`, checked as `PUT /vsock` is.
pub fn parse_vsock(s: &str) -> Result<vmm::machine::VsockConfig, String> {
    let mut cid = None;
    let mut uds = None;
    for (k, v) in pairs(s, "cid")? {
        match k {
            "cid" => {
                cid = Some(
                    v.parse::<u32>()
                        .map_err(|_| format!("cid={v}: not a number below 2^32"))?,
                )
            }
            "uds" => uds = Some(PathBuf::from(v)),
            _ => return Err(format!("--vsock: unknown option '{k}' (known: cid, uds)")),
        }
    }
    let v = crate::fc::Vsock {
        vsock_id: None,
        guest_cid: cid.ok_or("--vsock: cid=N is missing")?,
        uds_path: uds.ok_or("--vsock: uds=PATH is missing")?,
    };
    v.validate().map_err(|e| format!("--vsock: {e}"))?;
    Ok(vmm::machine::VsockConfig {
        id: None,
        guest_cid: u64::from(v.guest_cid),
        uds_path: v.uds_path,
    })
}

/// A disk in the machine file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub allow_absolute_backing: bool,
    /// "raw" or "qcow2"; absent: from the file name (docs/DISKS.md).
    #[serde(default, deserialize_with = "de_format")]
    pub format: Option<ImageFormat>,
}

/// A network device in the machine file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetEntry {
    pub tap: Option<String>,
    pub mac: Option<String>,
}

impl NetEntry {
    pub fn to_config(&self) -> Result<NetConfig, String> {
        let mut parts = Vec::new();
        if let Some(t) = &self.tap {
            parts.push(format!("tap={t}"));
        }
        if let Some(m) = &self.mac {
            parts.push(format!("mac={m}"));
        }
        parse_net(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock() {
        let v = parse_vsock("cid=3,uds=/tmp/v.sock").unwrap();
        assert_eq!((v.guest_cid, v.uds_path.to_str()), (3, Some("/tmp/v.sock")));
        assert_eq!(parse_vsock("7,uds=/x").unwrap().guest_cid, 7);
        for bad in ["cid=2,uds=/x", "cid=3", "uds=/x", "cid=x,uds=/x", "cid=3,uds=/x,port=1"] {
            assert!(parse_vsock(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=/a/b.img,readonly=on").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("/a/b.img"), true));
        assert!(
            parse_disk("path=a,allow-absolute-backing=on")
                .unwrap()
                .allow_absolute_backing
        );
        let d = parse_disk("x.img").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("x.img"), false));
        assert!(parse_disk("readonly=on").unwrap_err().contains("no path"));
        assert!(parse_disk("path=a,cache=none").unwrap_err().contains("unknown option"));
        assert!(parse_disk("path=a,readonly=maybe").is_err());
        assert_eq!(parse_disk("a.img").unwrap().format, None);
        assert_eq!(
            parse_disk("path=a.img,format=qcow2").unwrap().format,
            Some(ImageFormat::Qcow2)
        );
        assert_eq!(
            parse_disk("path=a.qcow2,format=raw").unwrap().format,
            Some(ImageFormat::Raw)
        );
        assert!(parse_disk("path=a,format=vmdk").unwrap_err().contains("vmdk"));
    }

    #[test]
    fn nets() {
        let n = parse_net("tap=tap0,mac=52:54:00:ab:cd:ef").unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(parse_net("").unwrap().tap, None);
        assert!(parse_net("mac=01:00:00:00:00:00").is_err());
        assert!(parse_net("mac=52:54:00").is_err());
        assert!(parse_net("tap=averyveryverylongname").is_err());
        assert!(parse_net("bridge=br0").is_err());
    }
}
