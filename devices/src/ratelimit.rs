//! Rate-limited logging for what a guest or a peer can trigger at will (a DMA fault per
//! command, a refused message per request): without a limit, a guest looping on a bad access
//! writes one log line per iteration and floods the host's logs.
//!
//! A [`RateLimit`] lets through at most `burst` lines per `interval`; what it holds back is
//! counted, and the next line it lets through says how many similar ones were suppressed
//! before it. [`warn_limited!`](crate::warn_limited) and
//! [`debug_limited!`](crate::debug_limited) give every call site its own limit;
//! [`log_limited!`](crate::log_limited) logs through a limit of one's own (a named static, so
//! a test can read its counters).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[doc(hidden)]
pub use tracing as __tracing;

/// Lines a call site may log per [`DEFAULT_INTERVAL`].
pub const DEFAULT_BURST: u32 = 10;
/// The window [`DEFAULT_BURST`] applies to.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// At most `burst` admissions per `interval`, counting what it refuses.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    interval: Duration,
    window: Mutex<Window>,
    admitted: AtomicU64,
    suppressed: AtomicU64,
}

#[derive(Debug)]
struct Window {
    /// When the current window opened; `None` before the first message.
    start: Option<Instant>,
    /// Lines let through in the current window.
    admitted: u32,
    /// Lines held back since the last line let through (in any window).
    pending: u64,
}

impl RateLimit {
    /// A limit of `burst` lines per `interval` (a `burst` of 0 suppresses everything).
    pub const fn new(burst: u32, interval: Duration) -> Self {
        RateLimit {
            burst,
            interval,
            window: Mutex::new(Window {
                start: None,
                admitted: 0,
                pending: 0,
            }),
            admitted: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// The default limit: [`DEFAULT_BURST`] lines per [`DEFAULT_INTERVAL`].
    pub const fn per_site() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_INTERVAL)
    }

    /// Whether a line may be logged now: `Some(k)` if so, `k` being how many were suppressed
    /// since the last line let through (to be said in this one); `None` if it is suppressed.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`RateLimit::admit`] at a given time (for tests).
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let expired = w
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if expired {
            w.start = Some(now);
            w.admitted = 0;
        }
        if w.admitted < self.burst {
            w.admitted += 1;
            self.admitted.fetch_add(1, Ordering::Relaxed);
            Some(std::mem::take(&mut w.pending))
        } else {
            w.pending += 1;
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Lines let through so far.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Lines suppressed so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

/// Logs a `format!`-style message at `level` (a `tracing` macro name: `warn`, `debug`, ..)
/// if `limit` (a `&RateLimit`) admits it, adding "(K similar messages suppressed)" when some
/// were held back before it.
#[macro_export]
macro_rules! log_limited {
    ($limit:expr, $level:ident, $($arg:tt)+) => {
        if let ::core::option::Option::Some(suppressed) =
            $crate::ratelimit::RateLimit::admit($limit)
        {
            if suppressed == 0 {
                $crate::ratelimit::__tracing::$level!("{}", ::core::format_args!($($arg)+));
            } else {
                $crate::ratelimit::__tracing::$level!(
                    "{} ({} similar messages suppressed)",
                    ::core::format_args!($($arg)+),
                    suppressed
                );
            }
        }
    };
}

/// `tracing::warn!` with a [`RateLimit::per_site`] limit of its own at this call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::per_site();
        $crate::log_limited!(&LIMIT, warn, $($arg)+)
    }};
}

/// `tracing::debug!` with a [`RateLimit::per_site`] limit of its own at this call site.
#[macro_export]
macro_rules! debug_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::per_site();
        $crate::log_limited!(&LIMIT, debug, $($arg)+)
    }};
}

#[cfg(test)]
pub(crate) mod capture;

#[cfg(test)]
mod tests;
