//! pinning
