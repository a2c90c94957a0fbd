#![no_main]
//! See `vmm_fuzz::api_request` for what this target drives and the invariants it checks.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm_fuzz::api_request::run(data));
