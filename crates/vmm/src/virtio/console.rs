//! virtio-console with one port, as a second console (`/dev/hvc0` in the
//! guest). What the guest writes goes to a host file; the guest reads
//! nothing from it yet.

use std::fs::File;
use std::io::{Read, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::Reader;

use super::worker::{spawn_queue_worker, Worker};
use super::{Activation, VirtioDevice, VIRTIO_F_VERSION_1};

const QUEUE_SIZE: u16 = 64;
/// Queue 0 receives (unused: no input yet); queue 1 transmits.
const TX: usize = 1;
/// Bytes taken from one transmit buffer at most.
const MAX_CHUNK: usize = 64 * 1024;

pub struct Console {
    output: File,
    worker: Option<Worker>,
}

impl Console {
    pub fn new(output: File) -> Self {
        Console { output, worker: None }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, _acked: u64, a: Activation) -> std::io::Result<()> {
        let mut output = self.output.try_clone()?;
        let mut buf = vec![0u8; MAX_CHUNK];
        self.worker = Some(spawn_queue_worker("virtio-console", a, TX, move |mem, chain, _dma| {
            if let Ok(mut r) = Reader::<()>::new(mem, chain) {
                let n = r.available_bytes().min(MAX_CHUNK);
                if r.read_exact(&mut buf[..n]).is_ok() {
                    let _ = output.write_all(&buf[..n]);
                }
            }
            0
        })?);
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Worker> {
        self.worker.take()
    }
}
