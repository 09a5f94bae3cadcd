//! Failover's disk overlay (docs/FAILOVER.md, "Disks"): while a VM is
//! protected, what the guest writes to a disk is kept here in memory (its
//! reads see it), grouped by the epoch that wrote it, sent to the standby
//! with that epoch, and written to the image only once the standby
//! acknowledged the epoch. So the image never holds a write the standby's
//! state does not explain, and the standby, which keeps the writes of the
//! epochs it applied, writes them at takeover before the guest resumes.
//!
//! Bounded: when an epoch's writes reach [`EPOCH_WRITE_LIMIT`] bytes, the
//! next write waits (the guest's I/O stalls) and asks for the epoch to end
//! early; a pause for the checkpoint lets it through.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use disk::BlockBackend;

/// The most bytes of writes one epoch gathers before the next write
/// waits for the checkpoint (one request may go over it).
pub const EPOCH_WRITE_LIMIT: u64 = 32 << 20;

/// One write the guest made, not yet in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Write zeroes (also a discard: the range may read as zeroes).
    Zero {
        offset: u64,
        len: u64,
    },
}

impl DiskOp {
    fn bytes(&self) -> u64 {
        match self {
            DiskOp::Write { data, .. } => data.len() as u64,
            DiskOp::Zero { .. } => 16,
        }
    }

    /// Lay this write over `buf`, which holds the disk from `at`.
    fn patch(&self, buf: &mut [u8], at: u64) {
        let (offset, len) = match self {
            DiskOp::Write { offset, data } => (*offset, data.len() as u64),
            DiskOp::Zero { offset, len } => (*offset, *len),
        };
        let start = offset.max(at);
        let end = (offset.saturating_add(len)).min(at + buf.len() as u64);
        if start >= end {
            return;
        }
        let dst = &mut buf[(start - at) as usize..(end - at) as usize];
        match self {
            DiskOp::Write { data, .. } => {
                dst.copy_from_slice(&data[(start - offset) as usize..(end - offset) as usize]);
            }
            DiskOp::Zero { .. } => dst.fill(0),
        }
    }

    /// Carry this write out on `disk`.
    pub fn apply(&self, disk: &dyn BlockBackend) -> disk::Result<()> {
        match self {
            DiskOp::Write { offset, data } => disk.write_at(data, *offset),
            DiskOp::Zero { offset, len } => disk.write_zeroes(*offset, *len, false),
        }
    }
}

#[derive(Default)]
pub struct EpochOverlay {
    inner: Mutex<Inner>,
    space: Condvar,
    /// A checkpoint is pausing the VM: a waiting write goes through.
    pausing: AtomicBool,
    /// An epoch is full: the primary should end it now.
    wants_epoch: AtomicBool,
    /// The device's disk, for commits (weak: a hand-over closes it).
    disk: Mutex<Option<Weak<dyn BlockBackend>>>,
}

#[derive(Default)]
struct Inner {
    holding: bool,
    /// The writes of the epoch running now.
    current: Vec<DiskOp>,
    current_bytes: u64,
    /// Ended epochs' writes, oldest first, until acknowledged.
    sealed: VecDeque<(u64, Vec<DiskOp>)>,
    pending_bytes: u64,
}

impl EpochOverlay {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_disk(&self, disk: &Arc<dyn BlockBackend>) {
        *self.disk.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(disk));
    }

    fn disk(&self) -> Option<Arc<dyn BlockBackend>> {
        self.disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }

    /// Read through the overlay: the image, then the writes not in it yet.
    pub fn read(&self, disk: &dyn BlockBackend, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        // Under the lock, so that a commit cannot move writes into the
        // image between this read and the patching.
        let g = self.lock();
        disk.read_at(buf, offset)?;
        for op in g.sealed.iter().flat_map(|(_, ops)| ops.iter()).chain(g.current.iter()) {
            op.patch(buf, offset);
        }
        Ok(())
    }

    /// A write (or zeroes): held while protected, else to the image.
    pub fn write(&self, disk: &dyn BlockBackend, op: DiskOp) -> disk::Result<()> {
        let mut g = self.lock();
        if !g.holding {
            return op.apply(disk);
        }
        let n = op.bytes();
        while g.holding
            && g.current_bytes > 0
            && g.current_bytes + n > EPOCH_WRITE_LIMIT
            && !self.pausing.load(Ordering::Acquire)
        {
            self.wants_epoch.store(true, Ordering::Release);
            g = self
                .space
                .wait_timeout(g, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if !g.holding {
            return op.apply(disk);
        }
        g.current_bytes += n;
        g.pending_bytes += n;
        g.current.push(op);
        Ok(())
    }

    /// A guest flush: while protected the writes are in the overlay,
    /// which is all a flush promises here (what the outside world learns
    /// of it waits for the epoch's acknowledgement anyway).
    pub fn flush(&self, disk: &dyn BlockBackend) -> disk::Result<()> {
        if self.lock().holding {
            return Ok(());
        }
        disk.flush()
    }

    /// Protection begins (the VM is paused): what was written so far is
    /// made durable, and from now on writes are held.
    pub fn start(&self) -> disk::Result<()> {
        let mut g = self.lock();
        if let Some(d) = self.disk() {
            d.flush()?;
        }
        g.holding = true;
        Ok(())
    }

    /// The epoch ends (the VM is paused): its writes, to send with it.
    pub fn seal(&self, epoch: u64) -> Vec<DiskOp> {
        let mut g = self.lock();
        let ops = std::mem::take(&mut g.current);
        g.current_bytes = 0;
        g.sealed.push_back((epoch, ops.clone()));
        self.wants_epoch.store(false, Ordering::Release);
        self.space.notify_all();
        ops
    }

    /// `epoch` is acknowledged: write its writes (and older epochs') to
    /// the image and make them durable.
    pub fn commit(&self, epoch: u64) -> disk::Result<()> {
        let mut g = self.lock();
        let Some(disk) = self.disk() else { return Ok(()) };
        let mut wrote = false;
        while g.sealed.front().is_some_and(|&(e, _)| e <= epoch) {
            let (_, ops) = g.sealed.pop_front().expect("checked");
            for op in &ops {
                g.pending_bytes -= op.bytes();
                op.apply(&*disk)?;
            }
            wrote = true;
        }
        if wrote {
            disk.flush()?;
        }
        Ok(())
    }

    /// Protection ends with nobody to take over (the standby is gone, or
    /// the VM stopped): every held write goes to the image, and writes go
    /// straight through from now on.
    pub fn release_all(&self) -> disk::Result<()> {
        let mut g = self.lock();
        g.holding = false;
        let sealed: Vec<_> = g.sealed.drain(..).flat_map(|(_, ops)| ops).collect();
        let current = std::mem::take(&mut g.current);
        g.current_bytes = 0;
        g.pending_bytes = 0;
        self.space.notify_all();
        let Some(disk) = self.disk() else { return Ok(()) };
        for op in sealed.iter().chain(current.iter()) {
            op.apply(&*disk)?;
        }
        disk.flush()
    }

    /// Set around a checkpoint's pause, so that no write waits through it.
    pub fn set_pausing(&self, on: bool) {
        self.pausing.store(on, Ordering::Release);
        if on {
            self.space.notify_all();
        }
    }

    /// Whether writes are held (the VM is protected).
    pub fn holding(&self) -> bool {
        self.lock().holding
    }

    /// An epoch is full: end it early.
    pub fn wants_epoch(&self) -> bool {
        self.wants_epoch.load(Ordering::Acquire)
    }

    /// Bytes of writes held, not yet in the image.
    pub fn held_bytes(&self) -> u64 {
        self.lock().pending_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_held_read_back_and_committed_by_epoch() {
        let dir = std::env::temp_dir().join(format!("vessel-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.raw");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let disk: Arc<dyn BlockBackend> = Arc::from(
            disk::open_with(
                &path,
                &disk::OpenOptions {
                    read_only: false,
                    format: Some(disk::ImageFormat::Raw),
                },
                &disk::BackingRules::default(),
            )
            .unwrap(),
        );
        let o = EpochOverlay::default();
        o.set_disk(&disk);
        o.start().unwrap();
        o.write(
            &*disk,
            DiskOp::Write {
                offset: 512,
                data: vec![7; 512],
            },
        )
        .unwrap();
        let s1 = o.seal(1);
        assert_eq!(s1.len(), 1);
        o.write(&*disk, DiskOp::Zero { offset: 600, len: 100 }).unwrap();
        let mut buf = vec![0u8; 1024];
        o.read(&*disk, &mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 1));
        assert!(buf[512..600].iter().all(|&b| b == 7));
        assert!(buf[600..700].iter().all(|&b| b == 0));
        assert!(buf[700..].iter().all(|&b| b == 7));
        // Nothing in the image before the acknowledgement.
        assert_eq!(std::fs::read(&path).unwrap()[512], 1);
        o.seal(2);
        o.commit(1).unwrap();
        let img = std::fs::read(&path).unwrap();
        assert_eq!((img[512], img[650]), (7, 7));
        o.commit(2).unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[650], 0);
        assert_eq!(o.held_bytes(), 0);
        // Unprotected: straight through.
        o.write(
            &*disk,
            DiskOp::Write {
                offset: 512,
                data: vec![9; 512],
            },
        )
        .unwrap();
        o.seal(3);
        o.release_all().unwrap();
        o.write(
            &*disk,
            DiskOp::Write {
                offset: 0,
                data: vec![5; 512],
            },
        )
        .unwrap();
        let img = std::fs::read(&path).unwrap();
        assert_eq!((img[0], img[512]), (5, 9));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
