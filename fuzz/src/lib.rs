//! Helpers shared by the fuzz targets in `fuzz_targets/` and the seed generator in
//! `examples/make_seeds.rs`.
//!
//! The targets read their input with [`Input`], a byte reader that never fails: past the end
//! every number reads 0 and every slice is empty, so any byte string is a valid program of
//! operations and libFuzzer's mutations stay meaningful. Nothing here uses libfuzzer-sys, so
//! the seed generator links without the fuzzer runtime.

pub mod api_request;
mod bus_model;
pub mod cgroup;
pub mod config_io;
pub mod ecam;
pub mod epf;
pub mod loader;
pub mod msix;
pub mod pci_config;
pub mod serial;
pub mod vfio_msix;
pub mod vfio_pci;
pub mod vfio_user_client;
pub mod vfio_user_server;

/// Every target: its name (the binary in `fuzz_targets/`), its harness and its seeds.
pub type Target = (
    &'static str,
    fn(&[u8]),
    fn() -> Vec<(&'static str, Vec<u8>)>,
);

/// The targets, in the order the README lists them.
pub const TARGETS: &[Target] = &[
    ("pci_config", pci_config::run, pci_config::seeds),
    ("msix", msix::run, msix::seeds),
    ("ecam", ecam::run, ecam::seeds),
    ("config_io", config_io::run, config_io::seeds),
    ("serial", serial::run, serial::seeds),
    ("epf", epf::run, epf::seeds),
    (
        "vfio_user_client",
        vfio_user_client::run,
        vfio_user_client::seeds,
    ),
    (
        "vfio_user_server",
        vfio_user_server::run,
        vfio_user_server::seeds,
    ),
    ("vfio_pci", vfio_pci::run, vfio_pci::seeds),
    ("vfio_msix", vfio_msix::run, vfio_msix::seeds),
    ("loader", loader::run, loader::seeds),
    ("cgroup", cgroup::run, cgroup::seeds),
    ("api_request", api_request::run, api_request::seeds),
];

/// A forgiving little-endian reader over fuzz input.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// The next `N` bytes, zero-padded past the end.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        out
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A bool from the low bit of a byte.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A length byte, then up to that many bytes (at most `max`).
    pub fn short_bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u8()).min(max);
        self.bytes(n)
    }

    /// A little-endian u16 length, then up to that many bytes (at most `max`).
    pub fn long_bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()).min(max);
        self.bytes(n)
    }

    /// A width as [`Input::width`] reads it, then that many bytes.
    pub fn access(&mut self) -> &'a [u8] {
        let n = self.width();
        self.bytes(n)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// An access width as guests use them, mostly 1, 2, 4 or 8 bytes but sometimes 0, 3 or
    /// up to 16, so malformed shapes are tried too.
    pub fn width(&mut self) -> usize {
        match self.u8() % 16 {
            0..=3 => 1,
            4..=7 => 2,
            8..=11 => 4,
            12 => 8,
            13 => 0,
            14 => 3,
            _ => 16,
        }
    }
}

/// Writer for seeds: the inverse of [`Input`].
#[derive(Clone, Debug, Default)]
pub struct Seed(pub Vec<u8>);

impl Seed {
    /// An empty seed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// Appends a length byte and the bytes (at most 255).
    pub fn short_bytes(&mut self, b: &[u8]) -> &mut Self {
        let b = &b[..b.len().min(255)];
        self.u8(b.len() as u8).bytes(b)
    }

    /// Appends a u16 length and the bytes.
    pub fn long_bytes(&mut self, b: &[u8]) -> &mut Self {
        let b = &b[..b.len().min(usize::from(u16::MAX))];
        self.u16(b.len() as u16).bytes(b)
    }

    /// The width byte [`Input::width`] reads back as `len`.
    pub fn width(&mut self, len: usize) -> &mut Self {
        self.u8(match len {
            1 => 0,
            2 => 4,
            4 => 8,
            8 => 12,
            0 => 13,
            3 => 14,
            _ => 15,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed runs through its harness without tripping an invariant, and the committed
    /// seed corpora are what `examples/make_seeds.rs` writes.
    #[test]
    fn seeds_pass_and_are_committed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        for (name, run, seeds) in TARGETS {
            for (seed, data) in seeds() {
                run(&data);
                let file = dir.join(name).join(seed);
                let committed = std::fs::read(&file)
                    .unwrap_or_else(|e| panic!("{}: {e}; run make_seeds", file.display()));
                assert!(
                    committed == data,
                    "{} is stale; run make_seeds",
                    file.display()
                );
            }
        }
    }

    #[test]
    fn seed_and_input_agree() {
        let mut s = Seed::new();
        s.u8(7)
            .u16(0x1234)
            .u32(0xdead_beef)
            .u64(u64::MAX)
            .short_bytes(b"abc");
        for w in [0, 1, 2, 3, 4, 8, 16] {
            s.width(w);
        }
        let mut i = Input::new(&s.0);
        assert_eq!(i.u8(), 7);
        assert_eq!(i.u16(), 0x1234);
        assert_eq!(i.u32(), 0xdead_beef);
        assert_eq!(i.u64(), u64::MAX);
        assert_eq!(i.short_bytes(255), b"abc");
        for w in [0, 1, 2, 3, 4, 8, 16] {
            assert_eq!(i.width(), w);
        }
        assert!(i.is_empty());
        assert_eq!(i.u32(), 0);
    }
}
