//! A device's worker thread: waits on eventfds and file descriptors with
//! epoll, and gives its queues back when told to stop.
//!
//! A worker checks for the stop request only between the chains it serves,
//! so a request it has taken from a queue is always completed (its used
//! entry written) before it stops: stopping never loses or repeats one.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{report_broken, serve, Chain};
use super::{Activation, DmaObserver};

/// The token the stop eventfd reports with.
pub const STOP_TOKEN: u64 = u64::MAX;

pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<Vec<Queue>>>,
}

impl Worker {
    /// Run `body` on a new thread. It gets a [`Poller`] that already
    /// watches the stop eventfd, and returns its queues when the poller
    /// reports [`STOP_TOKEN`].
    pub fn spawn<F>(name: &str, body: F) -> io::Result<Worker>
    where
        F: FnOnce(Poller) -> Vec<Queue> + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let poller = Poller::new()?;
        poller.add(stop.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        let stop_clone = stop.try_clone()?;
        let handle = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            // The poller's stop eventfd must outlive the loop.
            let _keep = stop_clone;
            crate::seccomp::enter(crate::seccomp::ThreadKind::Worker);
            body(poller)
        })?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }

    /// Ask the thread to stop. It finishes the chain it is serving first;
    /// [`Worker::join`] waits for that.
    pub fn request_stop(&self) {
        let _ = self.stop.write(1);
    }

    /// Stop the thread and take its queues back, where they stand after
    /// the last completed request. `None` if the thread panicked (its
    /// queues are lost).
    pub fn join(mut self) -> Option<Vec<Queue>> {
        self.request_stop();
        self.handle.take()?.join().ok()
    }
}

/// A worker told to stop by a device reset, not yet joined. Whoever can
/// afford to wait joins it: the vCPU that reset the device, once it no
/// longer holds the transport's lock (see
/// [`super::mmio::MmioTransport::take_retiring`]). Dropping it joins.
pub struct Retiring {
    worker: Option<Worker>,
    done: Arc<AtomicBool>,
}

impl Retiring {
    /// Tell `worker` to stop; `done` is set once it has ended.
    pub fn new(worker: Worker, done: Arc<AtomicBool>) -> Retiring {
        worker.request_stop();
        Retiring {
            worker: Some(worker),
            done,
        }
    }

    /// Wait for the worker to end (it finishes its request in flight).
    pub fn wait(self) {}
}

impl Drop for Retiring {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        self.done.store(true, Ordering::Release);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.stop.write(1);
            let _ = h.join();
        }
    }
}

pub struct Poller {
    epoll: Epoll,
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        Ok(Poller { epoll: Epoll::new()? })
    }

    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stop watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Wait up to `timeout` (forever with `None`) for events; returns the
    /// tokens that fired with their event sets (a stop request too).
    pub fn wait_events(&self, timeout: Option<std::time::Duration>) -> Vec<(u64, EventSet)> {
        let mut events = [EpollEvent::default(); 32];
        // Round up, so that a deadline 0.3 ms away does not spin.
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX));
        loop {
            match self.epoll.wait(ms, &mut events) {
                Ok(n) => {
                    return events[..n]
                        .iter()
                        .map(|e| (e.data(), EventSet::from_bits_truncate(e.events())))
                        .collect()
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio worker: epoll_wait failed: {e}");
                    return vec![(STOP_TOKEN, EventSet::IN)];
                }
            }
        }
    }

    /// Wait for events; returns the tokens that fired.
    pub fn wait(&self) -> Vec<u64> {
        let mut events = [EpollEvent::default(); 16];
        loop {
            match self.epoll.wait(-1, &mut events) {
                Ok(n) => return events[..n].iter().map(|e| e.data()).collect(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio worker: epoll_wait failed: {e}");
                    return vec![STOP_TOKEN];
                }
            }
        }
    }
}

/// Serve queue `q` of an activated device on a worker thread: wait for its
/// doorbell, serve the available chains with `handle` (which returns the
/// bytes it wrote into the chain), repeat. The device's other queues stay
/// idle. A driver that breaks the ring protocol marks the device broken.
pub fn spawn_queue_worker<F>(name: &'static str, a: Activation, q: usize, mut handle: F) -> io::Result<Worker>
where
    F: FnMut(&GuestMemoryMmap, Chain<'_>, &DmaObserver) -> u32 + Send + 'static,
{
    let Activation {
        mem,
        mut queues,
        notifiers,
        interrupt,
        broken,
        dma,
    } = a;
    Worker::spawn(name, move |poller| {
        let Some(notify) = notifiers.get(q) else {
            return queues;
        };
        if let Err(e) = poller.add(notify.as_raw_fd(), q as u64, EventSet::IN) {
            tracing::error!("{name}: cannot watch queue {q}: {e}");
            return queues;
        }
        loop {
            for token in poller.wait() {
                if token == STOP_TOKEN {
                    return queues;
                }
                let _ = notify.read();
                if broken.load(Ordering::Acquire) || !queues[q].ready() {
                    continue;
                }
                match serve(&mut queues[q], &mem, &interrupt, |chain| handle(&mem, chain, &dma)) {
                    // Work left over: come back after other events.
                    Ok(true) => {
                        let _ = notify.write(1);
                    }
                    Ok(false) => {}
                    Err(e) => report_broken(&broken, &interrupt, name, &e),
                }
            }
        }
    })
}
