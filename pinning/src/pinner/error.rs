//! Why a pin failed, with what its undo left behind, and who must act on it.

use std::ops::Range;

use crate::admission::AdmissionError;
use crate::backend::{BackendError, BackendKind};
use crate::cancel::CancelReason;
use crate::class::{Classify, ErrorClass};
use crate::engine::Undone;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("the {backend} backend could not start pinning guest RAM: {source}")]
    Begin {
        backend: BackendKind,
        #[source]
        source: BackendError,
    },
    #[error("the {backend} backend failed to pin guest RAM: {source}; {undone}")]
    Failed {
        backend: BackendKind,
        #[source]
        source: BackendError,
        undone: Box<Undone>,
    },
    #[error("pinning guest RAM with the {backend} backend stopped: a pinning thread panicked on bytes {:#x}..{:#x} of guest RAM ({message}); {undone}", chunk.start, chunk.end)]
    Panicked {
        backend: BackendKind,
        /// The chunk, as offsets into guest RAM (not guest addresses).
        chunk: Range<u64>,
        message: String,
        undone: Box<Undone>,
    },
    #[error("pinning cancelled by {reason}; {undone}")]
    Cancelled {
        reason: CancelReason,
        undone: Box<Undone>,
    },
    #[error("memory zone `{id}` covers guest addresses {start:#x}..{end:#x}, which are not all guest RAM: give each zone the RAM ranges of the layout")]
    ZoneOutsideRam { id: String, start: u64, end: u64 },
    /// A `JobError` the pinner has no variant for (a bad spec or zones, a helper that would
    /// not start), already a full message.
    #[error("{0}")]
    Engine(String),
}

impl Classify for PinError {
    /// A backend that fails after admission is the host refusing what should have worked; a
    /// panic is a bug; a cancellation is the signal's, unless its undo left something behind.
    fn class(&self) -> ErrorClass {
        match self {
            PinError::Admission(e) => e.class(),
            PinError::Cancelled { reason, undone } if undone.is_clean() => reason.class(),
            PinError::Cancelled { .. }
            | PinError::Begin { .. }
            | PinError::Failed { .. }
            | PinError::Panicked { .. }
            | PinError::ZoneOutsideRam { .. }
            | PinError::Engine(_) => ErrorClass::Internal,
        }
    }
}

impl PinError {
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        match self {
            PinError::Cancelled { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// What was undone, for an error that stopped a job under way.
    pub fn undone(&self) -> Option<&Undone> {
        match self {
            PinError::Failed { undone, .. }
            | PinError::Panicked { undone, .. }
            | PinError::Cancelled { undone, .. } => Some(undone.as_ref()),
            _ => None,
        }
    }

    pub(super) fn undone_mut(&mut self) -> Option<&mut Undone> {
        match self {
            PinError::Failed { undone, .. }
            | PinError::Panicked { undone, .. }
            | PinError::Cancelled { undone, .. } => Some(undone.as_mut()),
            _ => None,
        }
    }

    /// Whether the job's undo left something mapped or locked (which makes it the VMM's
    /// problem, whatever stopped the job).
    pub fn left_something_behind(&self) -> bool {
        self.undone().is_some_and(|u| !u.is_clean())
    }
}
