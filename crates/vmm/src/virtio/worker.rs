//! A device's worker thread: waits on eventfds and file descriptors with
//! epoll, and gives its queues back when told to stop.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
            body(poller)
        })?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }

    /// Stop the thread and take its queues back.
    pub fn stop(mut self) -> Vec<Queue> {
        let _ = self.stop.write(1);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default()
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
