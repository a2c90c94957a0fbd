//! What the caller asks of a pin: how many threads, how fine the chunks, whether to show
//! progress.

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

#[derive(Clone, Debug)]
pub struct PinOptions {
    pub threads: ThreadRequest,
    pub min_chunk: u64,
    /// Show a progress bar on a terminal for jobs over a second.
    pub progress: bool,
}

impl Default for PinOptions {
    fn default() -> Self {
        Self {
            threads: ThreadRequest::Auto,
            min_chunk: DEFAULT_MIN_CHUNK,
            progress: true,
        }
    }
}
