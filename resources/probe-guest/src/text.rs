//! Strings joined at compile time: a line or option that quotes a `guest_abi` constant is
//! still one string, matched or printed (one `puts`) exactly like a literal. And the decimal
//! numbers of the command line's options, read.

/// The `&'static str` of its parts (constant expressions) one after another.
macro_rules! text {
    ($($part:expr),+ $(,)?) => {{
        const PARTS: &[&str] = &[$($part),+];
        const BYTES: [u8; $crate::text::len(PARTS)] = $crate::text::join(PARTS);
        const TEXT: &str = match core::str::from_utf8(&BYTES) {
            Ok(s) => s,
            Err(_) => panic!("joined text is not UTF-8"),
        };
        TEXT
    }};
}

/// Total length of `parts`, in bytes.
pub const fn len(parts: &[&str]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < parts.len() {
        n += parts[i].len();
        i += 1;
    }
    n
}

/// The bytes of `parts` one after another; `N` must be their [`len`].
pub const fn join<const N: usize>(parts: &[&str]) -> [u8; N] {
    assert!(len(parts) == N);
    let mut out = [0u8; N];
    let mut at = 0;
    let mut i = 0;
    while i < parts.len() {
        let part = parts[i].as_bytes();
        let mut j = 0;
        while j < part.len() {
            out[at] = part[j];
            at += 1;
            j += 1;
        }
        i += 1;
    }
    out
}

/// A decimal number of at most 18 digits.
pub fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 18 {
        return None;
    }
    let mut v = 0u64;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (b - b'0') as u64;
    }
    Some(v)
}

/// A hexadecimal number of 1 to 16 digits, without a prefix.
pub fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &b in digits {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = v << 4 | u64::from(d);
    }
    Some(v)
}
