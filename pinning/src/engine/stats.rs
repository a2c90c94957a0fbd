//! What a job did, for reports and benchmarks.

use std::time::Duration;

use serde::{Serialize, Serializer};

use super::plan::DecidedBy;
use crate::prio::Lending;
use crate::GIB;

/// A completed job. A failed or cancelled job has no stats: its error says what was undone.
#[derive(Clone, Debug, Serialize)]
pub struct JobStats {
    pub threads: usize,
    pub decided_by: DecidedBy,
    pub chunk_size: u64,
    pub chunks: u64,
    pub bytes: u64,
    #[serde(rename = "elapsed_ms", serialize_with = "as_millis")]
    pub elapsed: Duration,
    pub lending: Lending,
    /// Per zone, for a job given zones ([`super::JobSpec::plan_zoned`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<ZoneStats>,
}

/// What one zone of a completed job did.
#[derive(Clone, Debug, Serialize)]
pub struct ZoneStats {
    pub id: String,
    /// The CPUs its helpers were pinned to; empty: any the process may run on (no CPUs were
    /// given, as for a memory-only node).
    pub cpus: Vec<usize>,
    pub threads: usize,
    /// What decided `threads` (see [`super::ZonePlan::decided_by`]).
    pub decided_by: DecidedBy,
    pub chunks: u64,
    pub bytes: u64,
    /// From its first chunk's start to its last chunk's end.
    #[serde(rename = "elapsed_ms", serialize_with = "as_millis")]
    pub elapsed: Duration,
    pub gibps: f64,
    /// Helpers that could not be pinned to `cpus` (each one is logged) and ran where the
    /// process may run instead.
    #[serde(skip_serializing_if = "is_zero")]
    pub unpinned: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

pub(crate) fn as_millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// Throughput in GiB/s (0 for an instantaneous or empty job).
pub(crate) fn gibps(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / GIB as f64 / secs
    } else {
        0.0
    }
}
