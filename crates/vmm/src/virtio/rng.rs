//! virtio-rng: fills the driver's buffers from the host's getrandom(2).

use std::io::Write;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::worker::{spawn_queue_worker, Worker};
use super::{write_chain, Activation, VirtioDevice, VIRTIO_F_VERSION_1};

const QUEUE_SIZE: u16 = 64;
/// Bytes given per request at most; the driver asks again for more.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    worker: Option<Worker>,
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer,
        // which we own and which is that long.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, _acked: u64, a: Activation) -> std::io::Result<()> {
        let mut buf = vec![0u8; MAX_REQUEST];
        self.worker = Some(spawn_queue_worker("virtio-rng", a, 0, move |mem, chain, dma| {
            write_chain(mem, chain, dma, |w| {
                let n = w.available_bytes().min(MAX_REQUEST);
                if !fill_random(&mut buf[..n]) || w.write_all(&buf[..n]).is_err() {
                    return 0;
                }
                n as u32
            })
            .unwrap_or(0)
        })?);
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Worker> {
        self.worker.take()
    }
}
