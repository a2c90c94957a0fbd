//! What the caller asks of a pin: how many threads, how fine the chunks, whether to show
//! progress, and which parts of guest RAM to fill from which CPUs.

use std::ops::Range;

use crate::engine::DEFAULT_MIN_CHUNK;

/// How many threads the user wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRequest {
    /// As many as the limits and the job allow.
    Auto,
    /// At most this many (still subject to the limits).
    AtMost(usize),
}

impl ThreadRequest {
    /// The most threads one may ask for: far above any host's CPU count, far below what
    /// would exhaust the process's threads or stacks.
    pub const MAX: usize = 4096;
}

impl std::str::FromStr for ThreadRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(ThreadRequest::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if (1..=Self::MAX).contains(&n) => Ok(ThreadRequest::AtMost(n)),
            _ => Err(format!(
                "`{s}` is not a thread count: use `auto` or a number from 1 to {}",
                Self::MAX
            )),
        }
    }
}

impl std::fmt::Display for ThreadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThreadRequest::Auto => f.write_str("auto"),
            ThreadRequest::AtMost(n) => write!(f, "{n}"),
        }
    }
}

/// A part of guest RAM whose pinning helpers run on given CPUs: a memory zone, filled from
/// its host node's CPUs so that first touch (and the DMA map) happens on that node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinZone {
    pub id: String,
    /// Its guest-physical ranges. The zones of a pin hold all of guest RAM, each byte once.
    pub ranges: Vec<Range<u64>>,
    /// Its host node's CPUs, already within the process's affinity. Empty: anywhere the
    /// process may run.
    pub cpus: Vec<usize>,
    /// The host node its memory is bound to, if any (for the warning when `cpus` is empty).
    pub host_numa_node: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct PinOptions {
    pub threads: ThreadRequest,
    pub min_chunk: u64,
    /// Show a progress bar on a terminal for jobs over a second.
    pub progress: bool,
    /// Empty: no zones, one shared queue of chunks for every helper.
    pub zones: Vec<PinZone>,
}

impl Default for PinOptions {
    fn default() -> Self {
        Self {
            threads: ThreadRequest::Auto,
            min_chunk: DEFAULT_MIN_CHUNK,
            progress: true,
            zones: Vec::new(),
        }
    }
}
