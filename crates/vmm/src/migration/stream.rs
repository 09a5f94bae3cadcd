//! The migration stream (docs/MIGRATION.md): a 16-byte header (magic,
//! version, reserved), then framed messages. Every frame is a type byte,
//! three zero bytes, a payload length (u32 LE) bounded per type, the
//! payload, and a CRC-64 (ECMA-182, u64 LE) of the frame before it. The
//! reader treats the stream as hostile: nothing is allocated before the
//! length is checked against its type's bound, nothing is used before the
//! checksum matches, and every count and address is checked.

use std::io::{Read, Write};

pub use vm_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::persist::{MachineState, PersistError};

/// The stream's first bytes.
pub const STREAM_MAGIC: [u8; 8] = *b"VESSELMG";
/// The stream version this Vessel writes and reads.
pub const STREAM_VERSION: u32 = 2;
/// Guest pages go by this size.
pub const PAGE_SIZE: u64 = 4096;
/// Most pages in one `Pages` message.
pub const MAX_PAGES_PER_MESSAGE: usize = 256;
const HEADER_LEN: usize = 16;
const FRAME_HEADER_LEN: usize = 8;
/// Bit 0 of a page entry's address word: the page is all zeroes and no
/// data follows.
const ZERO_PAGE: u64 = 1;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);

/// Why a migration stream could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("migration stream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the migration stream")]
    Closed,
    #[error("the migration stream is truncated (it ended inside a {0} message)")]
    Truncated(&'static str),
    #[error("not a Vessel migration stream (bad magic)")]
    BadMagic,
    #[error("migration stream version {found}, but this Vessel ({vessel}) reads version {ours}")]
    Version { found: u32, ours: u32, vessel: String },
    #[error("migration stream: unknown message type {0}")]
    UnknownType(u8),
    #[error("migration stream: a {kind} message of {len} bytes, more than its limit of {max}")]
    TooLong { kind: &'static str, len: u32, max: u32 },
    #[error("migration stream: checksum mismatch in a {0} message: the stream is corrupt")]
    Checksum(&'static str),
    #[error("migration stream: malformed {0} message: {1}")]
    Malformed(&'static str, String),
    #[error("migration stream: a {got} message where {expected} was expected")]
    Unexpected { got: &'static str, expected: &'static str },
    #[error("migration stream: machine state: {0}")]
    State(#[from] PersistError),
    #[error("the peer reported an error: {0}")]
    Peer(String),
    #[error("migration stream: guest memory: {0}")]
    Memory(String),
}

/// The source's first message: what the destination must allocate.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The source's Vessel, for messages.
    pub vessel_version: String,
    /// Guest memory in bytes (the layout `memory::ram_ranges` gives).
    pub mem_size: u64,
    pub cpus: u32,
}

/// A `Pages` message's payload, checked: a count (u32 LE), then per page
/// an address word (the page's guest-physical address, bit 0 set for a
/// page of zeroes) followed by 4096 bytes unless the page is zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBatch {
    payload: Vec<u8>,
    count: usize,
}

/// One page of a batch: its address and its bytes (`None`: all zeroes).
pub type PageRef<'a> = (u64, Option<&'a [u8]>);

impl PageBatch {
    fn parse(payload: Vec<u8>) -> Result<Self, StreamError> {
        let bad = |m: String| StreamError::Malformed("pages", m);
        if payload.len() < 4 {
            return Err(bad("no page count".into()));
        }
        let count = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
        if count == 0 || count > MAX_PAGES_PER_MESSAGE {
            return Err(bad(format!("{count} pages (1 to {MAX_PAGES_PER_MESSAGE} allowed)")));
        }
        let mut pos = 4;
        for i in 0..count {
            let Some(word) = payload.get(pos..pos + 8) else {
                return Err(bad(format!("page {i} of {count} is missing")));
            };
            let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            if word & (PAGE_SIZE - 1) & !ZERO_PAGE != 0 {
                return Err(bad(format!("page {i}: address word {word:#x} is not page aligned")));
            }
            pos += 8;
            if word & ZERO_PAGE == 0 {
                if payload.len() < pos + PAGE_SIZE as usize {
                    return Err(bad(format!("page {i} of {count} is cut short")));
                }
                pos += PAGE_SIZE as usize;
            }
        }
        if pos != payload.len() {
            return Err(bad(format!("{} bytes after the last page", payload.len() - pos)));
        }
        Ok(PageBatch { payload, count })
    }

    /// The pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = PageRef<'_>> {
        let mut pos = 4;
        (0..self.count).map(move |_| {
            let word = u64::from_le_bytes(self.payload[pos..pos + 8].try_into().expect("checked in parse"));
            pos += 8;
            if word & ZERO_PAGE != 0 {
                (word & !ZERO_PAGE, None)
            } else {
                let data = &self.payload[pos..pos + PAGE_SIZE as usize];
                pos += PAGE_SIZE as usize;
                (word, Some(data))
            }
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Builds a `Pages` message's payload.
#[derive(Default)]
pub struct PageBatchBuilder {
    payload: Vec<u8>,
    count: usize,
}

impl PageBatchBuilder {
    /// Add the page at `gpa` with its bytes; a page of zeroes goes as its
    /// address alone.
    pub fn push(&mut self, gpa: u64, data: &[u8]) {
        debug_assert!(gpa.is_multiple_of(PAGE_SIZE) && data.len() == PAGE_SIZE as usize);
        if self.count == 0 {
            self.payload.clear();
            self.payload.extend_from_slice(&[0; 4]);
        }
        if data.iter().all(|&b| b == 0) {
            self.payload.extend_from_slice(&(gpa | ZERO_PAGE).to_le_bytes());
        } else {
            self.payload.extend_from_slice(&gpa.to_le_bytes());
            self.payload.extend_from_slice(data);
        }
        self.count += 1;
        self.payload[..4].copy_from_slice(&(self.count as u32).to_le_bytes());
    }

    pub fn is_full(&self) -> bool {
        self.count >= MAX_PAGES_PER_MESSAGE
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Write the batch as one message and start a new one; the bytes
    /// written.
    pub fn flush(&mut self, w: &mut impl Write) -> Result<u64, StreamError> {
        if self.count == 0 {
            return Ok(0);
        }
        let n = write_frame(w, Kind::Pages, &self.payload)?;
        self.count = 0;
        Ok(n)
    }
}

/// A message of the stream.
#[derive(Debug)]
pub enum Message {
    /// Source → destination, first: the machine's size.
    Hello(Hello),
    /// Source → destination: guest pages.
    Pages(PageBatch),
    /// Source → destination, after the last pages: everything but memory
    /// (the same [`MachineState`] snapshots hold, in the snapshot file's
    /// own checked encoding).
    State(Box<MachineState>),
    /// Destination → source: the machine is built, paused, and ready to
    /// run. Until the source sees this, it may resume.
    Prepared,
    /// Source → destination: the source is stopped for good; run. Carries
    /// when the source's vCPUs stopped (ns since the Unix epoch), for the
    /// downtime figure, and how many rounds of pages it sent.
    Commit { paused_at_unix_ns: u64, iterations: u64 },
    /// Destination → source: the guest runs there; the measured downtime.
    Running { downtime_ms: u64 },
    /// Either way: the sender gives up, and why.
    Error(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Hello = 1,
    Pages = 2,
    State = 3,
    Prepared = 4,
    Commit = 5,
    Running = 6,
    Error = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Pages,
            3 => Kind::State,
            4 => Kind::Prepared,
            5 => Kind::Commit,
            6 => Kind::Running,
            7 => Kind::Error,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Pages => "pages",
            Kind::State => "state",
            Kind::Prepared => "prepared",
            Kind::Commit => "commit",
            Kind::Running => "running",
            Kind::Error => "error",
        }
    }

    /// The largest payload of this type.
    fn max_len(self) -> u32 {
        match self {
            Kind::Hello => 4096,
            Kind::Pages => 4 + MAX_PAGES_PER_MESSAGE as u32 * (8 + PAGE_SIZE as u32),
            // The snapshot file's bound, plus its own header and checksum.
            Kind::State => crate::persist::MAX_PAYLOAD as u32 + 32,
            Kind::Prepared => 0,
            Kind::Commit => 16,
            Kind::Running => 8,
            Kind::Error => 4096,
        }
    }
}

impl Message {
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Pages(_) => Kind::Pages,
            Message::State(_) => Kind::State,
            Message::Prepared => Kind::Prepared,
            Message::Commit { .. } => Kind::Commit,
            Message::Running { .. } => Kind::Running,
            Message::Error(_) => Kind::Error,
        }
    }
}

/// Write the stream header.
pub fn write_header(w: &mut impl Write) -> Result<u64, StreamError> {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&STREAM_MAGIC);
    h[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
    w.write_all(&h)?;
    Ok(HEADER_LEN as u64)
}

/// Read and check the stream header.
pub fn read_header(r: &mut impl Read) -> Result<(), StreamError> {
    let mut h = [0u8; HEADER_LEN];
    read_exact_or(r, &mut h, "header", true)?;
    if h[..8] != STREAM_MAGIC {
        return Err(StreamError::BadMagic);
    }
    let found = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if found != STREAM_VERSION {
        return Err(StreamError::Version {
            found,
            ours: STREAM_VERSION,
            vessel: format!("Vessel {}", env!("CARGO_PKG_VERSION")),
        });
    }
    if h[12..] != [0; 4] {
        return Err(StreamError::Malformed("header", "reserved bytes are not zero".into()));
    }
    Ok(())
}

fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<u64, StreamError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= kind.max_len())
        .ok_or_else(|| StreamError::Malformed(kind.name(), format!("{} bytes to send", payload.len())))?;
    let mut head = [0u8; FRAME_HEADER_LEN];
    head[0] = kind as u8;
    head[4..8].copy_from_slice(&len.to_le_bytes());
    let mut digest = CRC.digest();
    digest.update(&head);
    digest.update(payload);
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.write_all(&digest.finalize().to_le_bytes())?;
    Ok((FRAME_HEADER_LEN + payload.len() + 8) as u64)
}

/// Write one message; the bytes written.
pub fn write_message(w: &mut impl Write, m: &Message) -> Result<u64, StreamError> {
    let payload = match m {
        Message::Hello(h) => serde_json::to_vec(h).map_err(|e| StreamError::Malformed("hello", e.to_string()))?,
        Message::Pages(b) => b.payload.clone(),
        Message::State(s) => s.encode()?,
        Message::Prepared => Vec::new(),
        Message::Commit {
            paused_at_unix_ns,
            iterations,
        } => [paused_at_unix_ns.to_le_bytes(), iterations.to_le_bytes()].concat(),
        Message::Running { downtime_ms } => downtime_ms.to_le_bytes().to_vec(),
        Message::Error(e) => {
            // Cut at a character boundary within the bound.
            let mut end = e.len().min(Kind::Error.max_len() as usize);
            while !e.is_char_boundary(end) {
                end -= 1;
            }
            e.as_bytes()[..end].to_vec()
        }
    };
    write_frame(w, m.kind(), &payload)
}

/// `read_exact`, with an end of stream told apart: before the first byte
/// (`Closed`, when `at_boundary`) or inside a message (`Truncated`).
fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &'static str, at_boundary: bool) -> Result<(), StreamError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 && at_boundary => return Err(StreamError::Closed),
            Ok(0) => return Err(StreamError::Truncated(what)),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Read one message, checked.
pub fn read_message(r: &mut impl Read) -> Result<Message, StreamError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    read_exact_or(r, &mut head, "message", true)?;
    let kind = Kind::from_u8(head[0]).ok_or(StreamError::UnknownType(head[0]))?;
    let name = kind.name();
    if head[1..4] != [0; 3] {
        return Err(StreamError::Malformed(name, "reserved bytes are not zero".into()));
    }
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if len > kind.max_len() {
        return Err(StreamError::TooLong {
            kind: name,
            len,
            max: kind.max_len(),
        });
    }
    let mut payload = vec![0u8; len as usize];
    read_exact_or(r, &mut payload, name, false)?;
    let mut crc = [0u8; 8];
    read_exact_or(r, &mut crc, name, false)?;
    let mut digest = CRC.digest();
    digest.update(&head);
    digest.update(&payload);
    if digest.finalize() != u64::from_le_bytes(crc) {
        return Err(StreamError::Checksum(name));
    }
    let fixed = |p: &[u8]| -> Result<u64, StreamError> {
        p.try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| StreamError::Malformed(name, format!("{} bytes, not 8", p.len())))
    };
    Ok(match kind {
        Kind::Hello => {
            let h: Hello = serde_json::from_slice(&payload).map_err(|e| StreamError::Malformed(name, e.to_string()))?;
            Message::Hello(h)
        }
        Kind::Pages => Message::Pages(PageBatch::parse(payload)?),
        Kind::State => Message::State(Box::new(MachineState::decode(&payload)?)),
        Kind::Prepared => Message::Prepared,
        Kind::Commit => {
            if payload.len() != 16 {
                return Err(StreamError::Malformed(name, format!("{} bytes, not 16", payload.len())));
            }
            Message::Commit {
                paused_at_unix_ns: fixed(&payload[..8])?,
                iterations: fixed(&payload[8..])?,
            }
        }
        Kind::Running => Message::Running {
            downtime_ms: fixed(&payload)?,
        },
        Kind::Error => Message::Error(String::from_utf8_lossy(&payload).into_owned()),
    })
}

/// Check a [`Hello`] before allocating what it asks for: `max_mem` is the
/// most this destination gives a guest.
pub fn check_hello(h: &Hello, max_mem: u64) -> Result<(), StreamError> {
    let bad = |m: String| Err(StreamError::Malformed("hello", m));
    if h.mem_size < crate::memory::MIN_MEM || !h.mem_size.is_multiple_of(PAGE_SIZE) || h.mem_size > max_mem {
        return bad(format!(
            "memory size {} bytes (a multiple of 4096 from {} MiB to {} MiB allowed)",
            h.mem_size,
            crate::memory::MIN_MEM >> 20,
            max_mem >> 20
        ));
    }
    if h.cpus == 0 || h.cpus > crate::machine::MAX_CPUS {
        return bad(format!("{} vCPUs", h.cpus));
    }
    Ok(())
}

/// Write a batch of pages into guest memory; every page must lie wholly in
/// guest RAM.
pub fn apply_pages(mem: &GuestMemoryMmap, batch: &PageBatch) -> Result<(), StreamError> {
    static ZEROES: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
    for (gpa, data) in batch.pages() {
        let data = data.unwrap_or(&ZEROES);
        // write_slice refuses an address outside RAM or a page crossing
        // the end of a region; a page never spans two regions.
        match mem.write_slice(data, GuestAddress(gpa)) {
            Ok(()) => {}
            Err(e) => return Err(StreamError::Memory(format!("page at {gpa:#x}: {e}"))),
        }
    }
    Ok(())
}

/// What the destination received: memory filled in, and the state to
/// restore the machine from.
pub struct Incoming {
    pub hello: Hello,
    pub mem: GuestMemoryMmap,
    pub state: MachineState,
    /// Stream bytes read.
    pub bytes: u64,
    /// Page messages' pages (a page sent in several rounds counts each time).
    pub pages: u64,
}

/// The destination's side of a migration up to the machine state: the
/// header, `Hello` (memory is allocated by `alloc` once it is checked),
/// pages, and the state, which must describe the machine `Hello` named.
/// `progress` is told the bytes read so far after each message.
pub fn receive(
    r: &mut impl Read,
    max_mem: u64,
    alloc: &mut dyn FnMut(u64) -> Result<GuestMemoryMmap, String>,
    progress: &mut dyn FnMut(u64),
) -> Result<Incoming, StreamError> {
    let mut counted = CountingReader { inner: r, bytes: 0 };
    read_header(&mut counted)?;
    let hello = match read_message(&mut counted)? {
        Message::Hello(h) => h,
        Message::Error(e) => return Err(StreamError::Peer(e)),
        m => {
            return Err(StreamError::Unexpected {
                got: m.name(),
                expected: "hello",
            })
        }
    };
    check_hello(&hello, max_mem)?;
    let mem = alloc(hello.mem_size).map_err(StreamError::Memory)?;
    let mut pages = 0u64;
    loop {
        let m = read_message(&mut counted)?;
        progress(counted.bytes);
        match m {
            Message::Pages(batch) => {
                apply_pages(&mem, &batch)?;
                pages += batch.len() as u64;
            }
            Message::State(state) => {
                let c = &state.config;
                if c.mem_size != hello.mem_size || c.cpus != hello.cpus {
                    return Err(StreamError::Malformed(
                        "state",
                        format!(
                            "the state is of a machine with {} bytes and {} vCPUs, the hello said {} and {}",
                            c.mem_size, c.cpus, hello.mem_size, hello.cpus
                        ),
                    ));
                }
                return Ok(Incoming {
                    hello,
                    mem,
                    state: *state,
                    bytes: counted.bytes,
                    pages,
                });
            }
            Message::Error(e) => return Err(StreamError::Peer(e)),
            m => {
                return Err(StreamError::Unexpected {
                    got: m.name(),
                    expected: "pages or state",
                })
            }
        }
    }
}

/// Counts the bytes read through it.
pub struct CountingReader<'a, R: Read> {
    pub inner: &'a mut R,
    pub bytes: u64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The fuzz target's entry: run [`receive`] over `data` with at most
/// 32 MiB of guest memory; never panics, whatever the bytes.
pub fn fuzz_receive(data: &[u8]) {
    let mut r = data;
    let _ = receive(
        &mut r,
        crate::memory::MIN_MEM,
        &mut |size| crate::memory::create(size).map_err(|e| e.to_string()),
        &mut |_| {},
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            vessel_version: "test".into(),
            mem_size: 32 << 20,
            cpus: 1,
        }
    }

    /// A whole valid stream: header, hello, two batches, the state.
    fn sample_stream() -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out).unwrap();
        write_message(&mut out, &Message::Hello(hello())).unwrap();
        let mut b = PageBatchBuilder::default();
        let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        b.push(0x1000, &page);
        b.push(0x2000, &[0; 4096]);
        b.flush(&mut out).unwrap();
        b.push(0x3000, &page);
        b.flush(&mut out).unwrap();
        let mut state = crate::persist::tests::sample_state();
        state.config.mem_size = 32 << 20;
        write_message(&mut out, &Message::State(Box::new(state))).unwrap();
        out
    }

    fn receive_bytes(b: &[u8]) -> Result<Incoming, StreamError> {
        let mut r = b;
        receive(
            &mut r,
            64 << 20,
            &mut |size| crate::memory::create(size).map_err(|e| e.to_string()),
            &mut |_| {},
        )
    }

    #[test]
    fn round_trip_fills_memory() {
        let bytes = sample_stream();
        let got = receive_bytes(&bytes).unwrap();
        assert_eq!(got.hello, hello());
        assert_eq!(got.pages, 3);
        assert_eq!(got.bytes, bytes.len() as u64);
        let mut page = [0u8; 4096];
        got.mem.read_slice(&mut page, GuestAddress(0x3000)).unwrap();
        assert!(page.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        got.mem.read_slice(&mut page, GuestAddress(0x2000)).unwrap();
        assert!(page.iter().all(|&b| b == 0));
    }

    #[test]
    fn hand_over_messages_round_trip() {
        let mut out = Vec::new();
        for m in [
            Message::Prepared,
            Message::Commit {
                paused_at_unix_ns: 1_700_000_000_123_456_789,
                iterations: 7,
            },
            Message::Running { downtime_ms: 42 },
            Message::Error("x".repeat(10_000)),
        ] {
            write_message(&mut out, &m).unwrap();
        }
        let mut r = &out[..];
        assert!(matches!(read_message(&mut r).unwrap(), Message::Prepared));
        assert!(matches!(
            read_message(&mut r).unwrap(),
            Message::Commit {
                paused_at_unix_ns: 1_700_000_000_123_456_789,
                iterations: 7
            }
        ));
        assert!(matches!(
            read_message(&mut r).unwrap(),
            Message::Running { downtime_ms: 42 }
        ));
        // A long error is cut to its bound, not refused.
        assert!(matches!(read_message(&mut r).unwrap(), Message::Error(e) if e.len() == 4096));
        assert!(matches!(read_message(&mut r), Err(StreamError::Closed)));
        // A commit of the wrong size is malformed (a checksum over it
        // does not make it valid).
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Commit, &[1, 2, 3]).unwrap();
        assert!(read_message(&mut &v[..])
            .unwrap_err()
            .to_string()
            .contains("malformed commit"));
    }

    #[test]
    fn zero_pages_go_as_an_address() {
        let mut b = PageBatchBuilder::default();
        b.push(0, &[0; 4096]);
        let mut out = Vec::new();
        let n = b.flush(&mut out).unwrap();
        assert_eq!(n, 8 + 4 + 8 + 8);
    }

    #[test]
    fn refusals_name_the_problem() {
        let good = sample_stream();
        let err = |b: &[u8]| receive_bytes(b).err().expect("refused").to_string();
        assert!(err(&[]).contains("closed"));
        assert!(err(b"VESSELSNxxxxxxxx").contains("bad magic"));
        let mut v = good.clone();
        v[8] = 9;
        let e = err(&v);
        assert!(
            e.contains("version 9") && e.contains(&format!("version {STREAM_VERSION}")),
            "{e}"
        );
        // Every truncation is refused, never taken for a whole stream.
        for cut in [17, 30, good.len() / 2, good.len() - 1] {
            let e = err(&good[..cut]);
            assert!(e.contains("truncated") || e.contains("closed"), "{cut}: {e}");
        }
        // A flipped byte in a page: the checksum.
        let mut v = good.clone();
        v[200] ^= 0x40;
        assert!(err(&v).contains("checksum"), "{}", err(&v));
        // An absurd length is refused before allocating it.
        let mut v = good[..16].to_vec();
        v.extend_from_slice(&[2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(err(&v).contains("limit"), "{}", err(&v));
        let mut v = good[..16].to_vec();
        v.extend_from_slice(&[99, 0, 0, 0, 0, 0, 0, 0]);
        assert!(err(&v).contains("unknown message type 99"));
        // Pages before hello.
        let mut v = good[..16].to_vec();
        let mut b = PageBatchBuilder::default();
        b.push(0, &[1; 4096]);
        b.flush(&mut v).unwrap();
        assert!(err(&v).contains("where hello"), "{}", err(&v));
        // A page outside guest memory.
        let mut v = Vec::new();
        write_header(&mut v).unwrap();
        write_message(&mut v, &Message::Hello(hello())).unwrap();
        let mut b = PageBatchBuilder::default();
        b.push(1 << 40, &[1; 4096]);
        b.flush(&mut v).unwrap();
        assert!(err(&v).contains("guest memory"), "{}", err(&v));
        // Memory larger than the destination allows.
        let mut v = Vec::new();
        write_header(&mut v).unwrap();
        write_message(
            &mut v,
            &Message::Hello(Hello {
                mem_size: 1 << 50,
                ..hello()
            }),
        )
        .unwrap();
        assert!(err(&v).contains("memory size"), "{}", err(&v));
        // The source gave up.
        let mut v = good[..16].to_vec();
        write_message(&mut v, &Message::Error("disk on fire".into())).unwrap();
        assert!(err(&v).contains("disk on fire"));
    }

    #[test]
    fn malformed_page_batches() {
        // A zero page is its address word alone.
        assert!(PageBatch::parse([1u32.to_le_bytes().to_vec(), 0x1001u64.to_le_bytes().to_vec()].concat()).is_ok());
        for payload in [
            vec![],
            0u32.to_le_bytes().to_vec(),
            1000u32.to_le_bytes().to_vec(),
            [1u32.to_le_bytes().to_vec(), 0x1800u64.to_le_bytes().to_vec()].concat(),
            [
                1u32.to_le_bytes().to_vec(),
                0x1000u64.to_le_bytes().to_vec(),
                vec![0; 10],
            ]
            .concat(),
            [
                1u32.to_le_bytes().to_vec(),
                0x1001u64.to_le_bytes().to_vec(),
                vec![0; 1],
            ]
            .concat(),
        ] {
            assert!(PageBatch::parse(payload.clone()).is_err(), "{payload:?}");
        }
    }

    /// The fuzz target's deterministic stand-in: a valid stream with bytes
    /// changed, and cut anywhere, never panics (the coverage-guided run
    /// reaches past the checksums).
    #[test]
    fn mutated_streams_never_panic() {
        let good = sample_stream();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..300 {
            let mut b = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 40) as u8;
            }
            fuzz_receive(&b);
            let cut = (x >> 20) as usize % b.len();
            fuzz_receive(&b[..cut]);
        }
    }
}
