//! virtio-blk over a [`disk::BlockBackend`] (a raw file, a qcow2 chain).
//!
//! Requests are checked before they reach the disk: the sector range must
//! lie inside the disk, lengths must be whole sectors, and a read-only
//! disk refuses writes. A host I/O error becomes VIRTIO_BLK_S_IOERR; the
//! VMM keeps running.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use disk::BlockBackend;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::epoch_overlay::{DiskOp, EpochOverlay};
use super::queue::Chain;
use super::worker::{spawn_queue_worker, Worker};
use super::{
    note_dma_writes, read_config_bytes, Activation, DmaObserver, HostBackend, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Data moves through a bounce buffer of this size, so a request of any
/// length costs bounded memory.
const CHUNK: usize = 256 * 1024;
/// Segments in one discard or write-zeroes request.
const MAX_SEGMENTS: u32 = 32;
/// Sectors one discard or write-zeroes segment may cover (4 GiB - 512).
const MAX_SEGMENT_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;

/// Counters a user can read (and tests check).
#[derive(Debug, Default)]
pub struct BlockMetrics {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub io_errors: AtomicU64,
    pub invalid_requests: AtomicU64,
}

/// The device's state beyond its transport: its identity and options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub id: String,
}

pub struct Block {
    /// `None` once handed over to a migration's destination.
    disk: Option<Arc<dyn BlockBackend>>,
    /// What the device is (it stays so while the disk is handed over).
    identity: BlockState,
    config: Vec<u8>,
    features: u64,
    worker: Option<Worker>,
    /// Failover: writes held until their epoch is acknowledged (passes
    /// straight through while unprotected).
    overlay: Arc<EpochOverlay>,
    pub metrics: Arc<BlockMetrics>,
}

impl Block {
    pub fn new(disk: Arc<dyn BlockBackend>) -> Self {
        let capacity = disk.size() / SECTOR_SIZE;
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        // struct virtio_blk_config, little-endian, up to write_zeroes_may_unmap.
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&(QUEUE_SIZE as u32 - 2).to_le_bytes()); // seg_max
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        config[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        config[36..40].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes()); // max_discard_sectors
        config[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_discard_seg
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        config[48..52].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        config[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        config[56] = 1; // write_zeroes_may_unmap
        let overlay = Arc::new(EpochOverlay::default());
        overlay.set_disk(&disk);
        Block {
            identity: BlockState {
                capacity_sectors: capacity,
                read_only: disk.read_only(),
                id: disk.id(),
            },
            disk: Some(disk),
            config,
            features,
            worker: None,
            overlay,
            metrics: Arc::default(),
        }
    }

    pub fn state(&self) -> BlockState {
        self.identity.clone()
    }

    fn disk(&self) -> std::io::Result<&Arc<dyn BlockBackend>> {
        self.disk.as_ref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotConnected, "the disk was handed over (migration)")
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, _acked: u64, a: Activation) -> std::io::Result<()> {
        let disk = self.disk()?.clone();
        let metrics = self.metrics.clone();
        let overlay = self.overlay.clone();
        self.worker = Some(spawn_queue_worker("virtio-blk", a, 0, move |mem, chain, dma| {
            RequestContext {
                disk: &*disk,
                overlay: Some(&overlay),
                metrics: &metrics,
                dma,
            }
            .handle(mem, chain)
        })?);
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Worker> {
        self.worker.take()
    }

    fn flush(&self) -> std::io::Result<()> {
        match &self.disk {
            Some(d) if !d.read_only() => d.flush().map_err(std::io::Error::other),
            _ => Ok(()),
        }
    }

    fn freeze_disk(&self, name: &str) -> std::io::Result<Option<std::path::PathBuf>> {
        let disk = self.disk()?;
        if disk.read_only() {
            return Ok(None);
        }
        disk.freeze_top(name).map_err(std::io::Error::other)
    }

    fn release_backend(&mut self) -> std::io::Result<()> {
        // Durable first (fdatasync), then closed: the worker, which held
        // the other reference, has ended (paused), so this drops the
        // image's files and with them its locks.
        self.flush()?;
        if self.disk.as_ref().is_some_and(|d| Arc::strong_count(d) > 1) {
            return Err(std::io::Error::other("the disk is still in use"));
        }
        self.disk = None;
        Ok(())
    }

    fn attach_backend(&mut self, backend: HostBackend) -> std::io::Result<()> {
        match backend {
            HostBackend::Disk(d) => {
                if d.size() / SECTOR_SIZE != self.identity.capacity_sectors || d.read_only() != self.identity.read_only
                {
                    return Err(std::io::Error::other("the disk reopened with another size or mode"));
                }
                self.overlay.set_disk(&d);
                self.disk = Some(d);
                Ok(())
            }
            HostBackend::Tap(_) => Err(std::io::Error::other("virtio-blk takes a disk, not a TAP")),
        }
    }

    fn epoch_overlay(&self) -> Option<Arc<EpochOverlay>> {
        (!self.identity.read_only).then(|| self.overlay.clone())
    }
}

/// Everything a request needs; also driven directly by the fuzz target.
pub struct RequestContext<'a> {
    pub disk: &'a dyn BlockBackend,
    /// Failover's overlay of held writes, if any.
    pub overlay: Option<&'a EpochOverlay>,
    pub metrics: &'a BlockMetrics,
    pub dma: &'a DmaObserver,
}

/// A request the device will not carry out, and the status it gets.
enum Failure {
    IoErr,
    Unsupported,
}

impl RequestContext<'_> {
    /// Carry out one request; returns the bytes written to the guest
    /// (data plus the status byte), or 0 for a chain with no room for a
    /// status byte.
    pub fn handle(&self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let written = self.handle_request(mem, chain.clone());
        note_dma_writes(&chain, self.dma);
        written
    }

    fn handle_request(&self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (Reader::<()>::new(mem, chain.clone()), Writer::<()>::new(mem, chain))
        else {
            self.metrics.invalid_requests.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            self.metrics.invalid_requests.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let Ok(mut status_writer) = writer.split_at(writable - 1) else {
            return 0;
        };
        let (status, data_len) = match self.execute(&mut reader, &mut writer) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Failure::IoErr) => (VIRTIO_BLK_S_IOERR, 0),
            Err(Failure::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        if status != VIRTIO_BLK_S_OK {
            self.metrics.io_errors.fetch_add(1, Ordering::Relaxed);
        }
        let _ = status_writer.write_all(&[status as u8]);
        data_len.saturating_add(1)
    }

    fn execute(&self, reader: &mut Reader<'_>, writer: &mut Writer<'_>) -> Result<u32, Failure> {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            self.metrics.invalid_requests.fetch_add(1, Ordering::Relaxed);
            return Err(Failure::IoErr);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let read_only = self.disk.read_only();
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let offset = self.checked_range(sector, len as u64)?;
                self.metrics.reads.fetch_add(1, Ordering::Relaxed);
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut done = 0usize;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    self.io(self.read_at(&mut buf[..n], offset + done as u64))?;
                    writer.write_all(&buf[..n]).map_err(|_| Failure::IoErr)?;
                    done += n;
                }
                Ok(len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if read_only {
                    return Err(Failure::IoErr);
                }
                let len = reader.available_bytes();
                let offset = self.checked_range(sector, len as u64)?;
                self.metrics.writes.fetch_add(1, Ordering::Relaxed);
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut done = 0usize;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    reader.read_exact(&mut buf[..n]).map_err(|_| Failure::IoErr)?;
                    self.io(self.write(DiskOp::Write {
                        offset: offset + done as u64,
                        data: buf[..n].to_vec(),
                    }))?;
                    done += n;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
                self.io(match self.overlay {
                    Some(o) => o.flush(self.disk),
                    None => self.disk.flush(),
                })?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let id = self.disk.id();
                let mut bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let n = id.len().min(bytes.len());
                bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
                let room = writer.available_bytes().min(bytes.len());
                writer.write_all(&bytes[..room]).map_err(|_| Failure::IoErr)?;
                Ok(room as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if read_only {
                    return Err(Failure::IoErr);
                }
                let segments = reader.available_bytes() / 16;
                if segments == 0 || segments > MAX_SEGMENTS as usize {
                    return Err(Failure::Unsupported);
                }
                for _ in 0..segments {
                    let mut seg = [0u8; 16];
                    reader.read_exact(&mut seg).map_err(|_| Failure::IoErr)?;
                    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                    let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
                    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                    let unmap = flags & 1 != 0;
                    // Reserved flag bits, and unmap on a discard, are errors
                    // (virtio 1.2, 5.2.6.1).
                    if flags & !1 != 0 || (kind == VIRTIO_BLK_T_DISCARD && unmap) || sectors > MAX_SEGMENT_SECTORS {
                        return Err(Failure::Unsupported);
                    }
                    let len = sectors as u64 * SECTOR_SIZE;
                    let offset = self.checked_range(sector, len)?;
                    if self.overlay.is_some_and(|o| o.holding()) {
                        // The overlay keeps both as zeroes (a discarded
                        // range may read as zeroes).
                        self.io(self.write(DiskOp::Zero { offset, len }))?;
                    } else if kind == VIRTIO_BLK_T_DISCARD {
                        self.io(self.disk.discard(offset, len))?;
                    } else {
                        self.io(self.disk.write_zeroes(offset, len, unmap))?;
                    }
                }
                Ok(0)
            }
            _ => Err(Failure::Unsupported),
        }
    }

    /// The byte offset of `sector`, if `len` bytes from there are whole
    /// sectors inside the disk.
    fn checked_range(&self, sector: u64, len: u64) -> Result<u64, Failure> {
        let ok = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|_| len.is_multiple_of(SECTOR_SIZE))
            .filter(|off| off.checked_add(len).is_some_and(|end| end <= self.disk.size()));
        ok.ok_or_else(|| {
            self.metrics.invalid_requests.fetch_add(1, Ordering::Relaxed);
            Failure::IoErr
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        match self.overlay {
            Some(o) => o.read(self.disk, buf, offset),
            None => self.disk.read_at(buf, offset),
        }
    }

    fn write(&self, op: DiskOp) -> disk::Result<()> {
        match self.overlay {
            Some(o) => o.write(self.disk, op),
            None => op.apply(self.disk),
        }
    }

    fn io<T>(&self, r: disk::Result<T>) -> Result<T, Failure> {
        r.map_err(|e| {
            tracing::warn!("virtio-blk: {e}");
            Failure::IoErr
        })
    }
}
