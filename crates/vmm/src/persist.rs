//! Saving and restoring a machine. Every component's state is a plain
//! serde value behind one trait, [`Persist`] (Firecracker's shape:
//! `save() -> State`, `restore(args, &State)`); [`MachineState`] gathers
//! them. Snapshots, migration and failover move this same value.
//!
//! The snapshot file (docs/SNAPSHOTS.md): an 8-byte magic, the format
//! version (u32 LE), 4 reserved bytes, the payload length (u64 LE), the
//! payload (JSON), and a CRC-64 (ECMA-182, u64 LE) of everything before
//! it. A file is hostile input: its size is bounded, every length and
//! count is checked, and nothing in it is trusted before the checksum and
//! the checks in [`MachineState::validate`] pass.

use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use x86emu::CpuState;

use crate::cpu_features::CpuFeatures;
use crate::devices::i8042::I8042;
use crate::devices::irq::RouterState;
use crate::devices::rtc::RtcState;
use crate::devices::serial::SerialData;
use crate::engine::EngineKind;
use crate::machine::MachineConfig;
use crate::virtio::mmio::MmioState;

/// The snapshot format this Vessel writes and reads.
/// Version 2 added the CPU features the guest saw and the state only KVM
/// holds (kvmclock, XSAVE areas).
pub const FORMAT_VERSION: u32 = 2;
/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"VESSELSN";
/// The largest state payload read (the state of 64 vCPUs and 8 devices is
/// far smaller); a larger length field is refused before any allocation.
pub const MAX_PAYLOAD: u64 = 16 << 20;
const HEADER_LEN: usize = 24;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);

/// Why a state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a Vessel snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found}, but this Vessel ({ours_vessel}) reads version {ours}")]
    Version { found: u32, ours: u32, ours_vessel: String },
    #[error("snapshot is truncated: {0}")]
    Truncated(String),
    #[error("snapshot state is {0} bytes, more than the limit of {MAX_PAYLOAD}")]
    TooLarge(u64),
    #[error("snapshot checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("snapshot state is malformed: {0}")]
    Malformed(String),
    #[error("snapshot state is invalid: {0}")]
    Invalid(String),
    #[error("cannot save: {0}")]
    Save(String),
}

/// A component whose state can be saved and restored.
pub trait Persist: Sized {
    /// The plain serde value the component's state is.
    type State: Serialize + for<'de> Deserialize<'de> + Clone + PartialEq + std::fmt::Debug;
    /// What restoring needs besides the state (its wiring to the machine).
    type Args;
    fn save(&self) -> Self::State;
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, PersistError>;
}

/// The platform devices on the port bus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformState {
    pub serial: SerialData,
    pub i8042: I8042,
    pub rtc: RtcState,
}

/// A disk as the snapshot refers to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    pub path: std::path::PathBuf,
    pub read_only: bool,
    /// Whether the snapshot froze the disk's contents. Raw disks are not
    /// frozen (as in Firecracker: flushed, referenced by path, the user's
    /// to manage).
    pub frozen: bool,
}

/// Everything about a machine except its memory, which goes to a file of
/// its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    /// The Vessel that wrote it, for messages.
    pub vessel_version: String,
    pub config: MachineConfig,
    /// The engine the VM ran under when saved.
    pub engine: EngineKind,
    /// The machine clock (ns since its start) when saved; restore goes on
    /// from here.
    pub clock_ns: u64,
    pub cpus: Vec<CpuState>,
    /// The CPU features the guest was offered: a restore needs an engine
    /// that offers them all.
    pub cpu_features: CpuFeatures,
    pub platform: PlatformState,
    pub interrupts: RouterState,
    /// Each virtio-mmio transport, in window order.
    pub devices: Vec<MmioState>,
    pub disks: Vec<DiskRef>,
    /// What only KVM holds, when saved under kvm: a restore under kvm
    /// loads it, one under emu has no use for it.
    pub kvm: Option<KvmState>,
}

/// The part of a machine's state that only KVM has and the engine-neutral
/// values cannot hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmState {
    /// The kvmclock's time (`KVM_GET_CLOCK`, ns) when saved.
    pub clock_ns: u64,
    /// Each vCPU's XSAVE area (`KVM_GET_XSAVE`, 4 KiB as 1024 words): the
    /// AVX and later registers, beyond the x87/SSE state in `CpuState`.
    pub xsave: Vec<Vec<u32>>,
}

/// Words in a [`KvmState`] XSAVE area.
pub const XSAVE_WORDS: usize = 1024;

impl MachineState {
    /// Checks that need no host resources: counts and sizes that the rest
    /// of the restore relies on.
    pub fn validate(&self) -> Result<(), PersistError> {
        let bad = |m: String| Err(PersistError::Invalid(m));
        let c = &self.config;
        if c.cpus == 0 || c.cpus > crate::machine::MAX_CPUS {
            return bad(format!("{} vCPUs", c.cpus));
        }
        if self.cpus.len() != c.cpus as usize {
            return bad(format!("{} vCPU states for {} vCPUs", self.cpus.len(), c.cpus));
        }
        if self.interrupts.lapics.len() != c.cpus as usize {
            return bad(format!(
                "{} local APIC states for {} vCPUs",
                self.interrupts.lapics.len(),
                c.cpus
            ));
        }
        if c.mem_size < crate::memory::MIN_MEM || !c.mem_size.is_multiple_of(4096) {
            return bad(format!("memory size {}", c.mem_size));
        }
        let expected = c.disks.len()
            + c.nets.len()
            + usize::from(c.rng)
            + usize::from(c.console_output.is_some())
            + usize::from(c.vsock.is_some());
        if self.devices.len() != expected || expected > crate::virtio::MAX_DEVICES {
            return bad(format!(
                "{} device states for {expected} configured devices",
                self.devices.len()
            ));
        }
        if self.disks.len() != c.disks.len() {
            return bad(format!(
                "{} disk references for {} disks",
                self.disks.len(),
                c.disks.len()
            ));
        }
        for (i, (d, cfg)) in self.disks.iter().zip(&c.disks).enumerate() {
            if d.frozen && (d.read_only || cfg.read_only) {
                return bad(format!("disk {i} is read-only but marked frozen"));
            }
        }
        if let Some(k) = &self.kvm {
            if k.xsave.len() != c.cpus as usize || k.xsave.iter().any(|x| x.len() != XSAVE_WORDS) {
                return bad(format!(
                    "{} KVM XSAVE areas (each must be {XSAVE_WORDS} words) for {} vCPUs",
                    k.xsave.len(),
                    c.cpus
                ));
            }
        }
        if self.platform.serial.in_buffer.len() > 64 {
            return bad("serial FIFO longer than 64 bytes".into());
        }
        Ok(())
    }

    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, PersistError> {
        let payload = serde_json::to_vec(self).map_err(|e| PersistError::Save(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 8);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        let crc = CRC.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parse and check a snapshot file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<MachineState, PersistError> {
        if bytes.len() < 8 || bytes[..8] != MAGIC {
            return Err(if bytes.len() < 8 {
                PersistError::Truncated(format!("{} bytes, no header", bytes.len()))
            } else {
                PersistError::BadMagic
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(PersistError::Truncated(format!("{} bytes, no header", bytes.len())));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(PersistError::Version {
                found: version,
                ours: FORMAT_VERSION,
                ours_vessel: format!("Vessel {}", env!("CARGO_PKG_VERSION")),
            });
        }
        let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if len > MAX_PAYLOAD {
            return Err(PersistError::TooLarge(len));
        }
        let need = HEADER_LEN + len as usize + 8;
        if bytes.len() < need {
            return Err(PersistError::Truncated(format!("{} of {need} bytes", bytes.len())));
        }
        if bytes.len() > need {
            return Err(PersistError::Malformed(format!(
                "{} bytes after the checksum",
                bytes.len() - need
            )));
        }
        let body = &bytes[..HEADER_LEN + len as usize];
        let crc = u64::from_le_bytes(bytes[need - 8..need].try_into().expect("8 bytes"));
        if CRC.checksum(body) != crc {
            return Err(PersistError::Checksum);
        }
        let state: MachineState =
            serde_json::from_slice(&body[HEADER_LEN..]).map_err(|e| PersistError::Malformed(e.to_string()))?;
        state.validate()?;
        Ok(state)
    }

    /// Give a restore of this state its own writable layer on every disk
    /// frozen into the snapshot: a new, empty qcow2 overlay on the frozen
    /// layer, named `<frozen layer>.<clone_id>.qcow2` beside it
    /// ([`disk::ops::clone_overlay`]), which the configuration then names.
    /// Disks not frozen keep their path. Returns the overlays made; on
    /// error, those made so far are removed again.
    pub fn clone_disks(&mut self, clone_id: &str) -> Result<Vec<std::path::PathBuf>, PersistError> {
        if !disk::ops::valid_snapshot_name(clone_id) {
            return Err(PersistError::Invalid(format!("clone id {clone_id:?}")));
        }
        let mut made: Vec<std::path::PathBuf> = Vec::new();
        let undo = |made: &[std::path::PathBuf]| {
            for f in made {
                let _ = std::fs::remove_file(f);
            }
        };
        for (d, cfg) in self.disks.iter().zip(self.config.disks.iter_mut()) {
            if !d.frozen {
                continue;
            }
            let stem = d
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let overlay = d.path.with_file_name(format!("{stem}.{clone_id}.qcow2"));
            let rules = disk::BackingRules {
                allow_absolute_backing: cfg.allow_absolute_backing,
            };
            if let Err(e) = disk::ops::clone_overlay(&d.path, &overlay, &rules) {
                undo(&made);
                return Err(PersistError::Invalid(format!(
                    "disk {}: cannot make the clone's overlay: {e}",
                    d.path.display()
                )));
            }
            cfg.path = overlay.clone();
            cfg.format = Some(disk::ImageFormat::Qcow2);
            made.push(overlay);
        }
        Ok(made)
    }

    /// Write the snapshot file (to a temporary name, then renamed, so a
    /// crash never leaves half a snapshot under the real name).
    pub fn write_file(&self, path: &Path) -> Result<u64, PersistError> {
        let bytes = self.encode()?;
        let io = |source| PersistError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("vessel-tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(bytes.len() as u64)
    }

    /// Read a snapshot file, reading no more than the format allows.
    pub fn read_file(path: &Path) -> Result<MachineState, PersistError> {
        let io = |source| PersistError::Io {
            path: path.display().to_string(),
            source,
        };
        // Non-blocking, and only a regular file: a FIFO or a device named
        // by a client must not hang the VMM.
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(io)?;
        if !f.metadata().map_err(io)?.is_file() {
            return Err(PersistError::Malformed(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let mut bytes = Vec::new();
        f.take(HEADER_LEN as u64 + MAX_PAYLOAD + 9)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        Self::decode(&bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid state: one vCPU, no devices (for the migration
    /// stream's tests too).
    pub(crate) fn sample_state() -> MachineState {
        sample()
    }

    fn sample() -> MachineState {
        let mut router = crate::devices::irq::InterruptRouter::new(1, 1_000_000_000);
        router.setup_virtual_wire();
        MachineState {
            vessel_version: "test".into(),
            config: MachineConfig {
                cmdline: "console=ttyS0".into(),
                ..MachineConfig::new("/k".into(), 64 << 20)
            },
            engine: EngineKind::Emu,
            clock_ns: 123,
            cpus: vec![CpuState::reset()],
            cpu_features: CpuFeatures::emu(1),
            platform: PlatformState {
                serial: SerialData::default(),
                i8042: I8042::default(),
                rtc: crate::devices::rtc::Rtc::new(0).state(),
            },
            interrupts: router.state(),
            devices: Vec::new(),
            disks: Vec::new(),
            kvm: None,
        }
    }

    #[test]
    fn file_round_trip_and_refusals() {
        let s = sample();
        let bytes = s.encode().unwrap();
        assert_eq!(MachineState::decode(&bytes).unwrap(), s);
        let err = |b: &[u8]| MachineState::decode(b).unwrap_err().to_string();
        assert!(err(&bytes[..bytes.len() - 1]).contains("truncated"));
        assert!(err(b"").contains("truncated"));
        assert!(err(b"NOTVESSELxxxxxxxxxxxxxxxxxxxxxx").contains("not a Vessel snapshot"));
        let mut v = bytes.clone();
        v[8] = 7;
        let e = err(&v);
        assert!(
            e.contains("version 7") && e.contains(&format!("version {FORMAT_VERSION}")),
            "{e}"
        );
        let mut v = bytes.clone();
        v[30] ^= 1;
        assert!(err(&v).contains("checksum"));
        let mut v = bytes.clone();
        v[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&v).contains("limit"));
        let mut s2 = sample();
        s2.kvm = Some(KvmState {
            clock_ns: 5,
            xsave: vec![vec![0; XSAVE_WORDS]],
        });
        assert_eq!(MachineState::decode(&s2.encode().unwrap()).unwrap(), s2);
        s2.kvm = Some(KvmState {
            clock_ns: 5,
            xsave: vec![vec![0; 3]],
        });
        assert!(err(&s2.encode().unwrap()).contains("XSAVE"));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(err(&extra).contains("after the checksum"));
    }

    /// The fuzz target's deterministic stand-in: mutations of a valid file
    /// (with the checksum fixed up, so the parser behind it is reached)
    /// never panic.
    #[test]
    fn mutated_states_never_panic() {
        let bytes = sample().encode().unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..2000 {
            let mut b = bytes[..bytes.len() - 8].to_vec();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = 24 + (x as usize) % (b.len() - 24);
                b[i] = (x >> 40) as u8;
            }
            let crc = CRC.checksum(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            let _ = MachineState::decode(&b);
        }
    }

    /// The round trip every [`Persist`] implementation passes: restoring
    /// the saved state gives a component that saves the same state.
    pub(crate) fn round_trip<T: Persist>(component: &T, args: T::Args) {
        let state = component.save();
        let json = serde_json::to_string(&state).expect("state serializes");
        let back: T::State = serde_json::from_str(&json).expect("state deserializes");
        assert_eq!(back, state);
        let restored = T::restore(args, &back).expect("restore");
        assert_eq!(restored.save(), state);
    }
}

mod impls {
    use std::io::Write;
    use std::sync::Arc;

    use vm_memory::GuestMemoryMmap;

    use super::{Persist, PersistError};
    use crate::devices::i8042::I8042;
    use crate::devices::irq::{InterruptRouter, RouterState};
    use crate::devices::rtc::{Rtc, RtcState};
    use crate::devices::serial::{SerialData, SerialPort};
    use crate::virtio::mmio::{MmioState, MmioTransport};
    use crate::virtio::{DmaObserver, Interrupt, VirtioDevice};

    impl Persist for I8042 {
        type State = I8042;
        type Args = ();
        fn save(&self) -> I8042 {
            self.clone()
        }
        fn restore(_: (), state: &I8042) -> Result<Self, PersistError> {
            Ok(state.clone())
        }
    }

    impl Persist for Rtc {
        type State = RtcState;
        type Args = ();
        fn save(&self) -> RtcState {
            self.state()
        }
        fn restore(_: (), state: &RtcState) -> Result<Self, PersistError> {
            Ok(Rtc::from_state(state.clone()))
        }
    }

    impl Persist for InterruptRouter {
        type State = RouterState;
        type Args = ();
        fn save(&self) -> RouterState {
            self.state()
        }
        fn restore(_: (), state: &RouterState) -> Result<Self, PersistError> {
            if state.lapics.is_empty() || state.lapics.len() > crate::machine::MAX_CPUS as usize {
                return Err(PersistError::Invalid(format!("{} local APICs", state.lapics.len())));
            }
            Ok(InterruptRouter::from_state(state.clone()))
        }
    }

    impl<W: Write> Persist for SerialPort<W> {
        type State = SerialData;
        /// Where the restored port writes.
        type Args = W;
        fn save(&self) -> SerialData {
            SerialPort::save(self)
        }
        fn restore(out: W, state: &SerialData) -> Result<Self, PersistError> {
            SerialPort::restore(state, out).map_err(PersistError::Invalid)
        }
    }

    impl Persist for MmioTransport {
        type State = MmioState;
        /// The device model and the transport's wiring, as for `new`.
        type Args = (Box<dyn VirtioDevice>, GuestMemoryMmap, Arc<Interrupt>, DmaObserver);
        fn save(&self) -> MmioState {
            self.state()
        }
        fn restore(args: Self::Args, state: &MmioState) -> Result<Self, PersistError> {
            let (device, mem, interrupt, dma) = args;
            let mut t = MmioTransport::new(device, mem, interrupt, dma)
                .map_err(|e| PersistError::Invalid(format!("virtio transport: {e}")))?;
            t.restore_state(state).map_err(PersistError::Invalid)?;
            Ok(t)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::tests::round_trip;
        use super::*;

        #[test]
        fn every_component_round_trips() {
            round_trip(&I8042::default(), ());
            let mut rtc = Rtc::new(0);
            rtc.write(0x70, 0x0b, 5);
            rtc.write(0x71, 0x06, 6);
            round_trip(&rtc, ());
            let mut router = InterruptRouter::new(2, 1_000_000_000);
            router.setup_virtual_wire();
            round_trip(&router, ());
            let mut serial = SerialPort::new(Vec::new());
            serial.write(crate::devices::serial::COM1_BASE + 1, 1);
            serial.queue_input(b"xy");
            serial.refill();
            round_trip(&serial, Vec::new());
            let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
            struct NoLine;
            impl crate::devices::irq_line::InterruptLine for NoLine {
                fn trigger(&self) {}
            }
            let line: Arc<dyn crate::devices::irq_line::InterruptLine> = Arc::new(NoLine);
            let t = MmioTransport::new(
                Box::new(crate::virtio::rng::Rng::default()),
                mem.clone(),
                Arc::new(Interrupt::new(line.clone())),
                crate::virtio::no_dma_observer(),
            )
            .unwrap();
            round_trip(
                &t,
                (
                    Box::new(crate::virtio::rng::Rng::default()),
                    mem,
                    Arc::new(Interrupt::new(line)),
                    crate::virtio::no_dma_observer(),
                ),
            );
        }
    }
}
