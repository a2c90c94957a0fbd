//! Memory sizes on the command line: `4G`, `512M`, `1T`, `64K`, `1.5G`; a bare number is
//! MiB, as with QEMU's `-m`.

/// Parses a size; the error says what was wrong and what is accepted.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || {
        format!("`{text}` is not a size: use a positive number with K, M, G or T (for example 512M, 4G, 1T)")
    };
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (number, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (body, 20),
        _ => return Err(bad()),
    };
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(if bytes < 1.0 {
            format!("`{text}`: a size must be more than zero")
        } else {
            bad()
        });
    }
    Ok(bytes as u64)
}

/// "4 GiB", "1.5 GiB": the pinning crate's formatting, re-exported for one style everywhere.
pub use pinning::admission::human;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("256"), Ok(256 << 20));
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        for bad in ["0", "-1", "4Q", "", "G", "1..5G", "0M", "99999999999T"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }
}
