pub const PROBE_GUEST: &[u8] = &[];
