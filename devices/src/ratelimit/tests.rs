use std::time::{Duration, Instant};

use super::{capture, RateLimit, DEFAULT_BURST};

#[test]
fn admits_a_burst_per_interval_and_counts_the_rest() {
    let limit = RateLimit::new(3, Duration::from_secs(10));
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // The first three lines of a window pass, the rest are held back.
    assert_eq!(limit.admit_at(at(0)), Some(0));
    assert_eq!(limit.admit_at(at(1)), Some(0));
    assert_eq!(limit.admit_at(at(2)), Some(0));
    for i in 0..100 {
        assert_eq!(limit.admit_at(at(3 + i)), None);
    }
    assert_eq!((limit.admitted(), limit.suppressed()), (3, 100));
    // Still the same window just before it ends.
    assert_eq!(limit.admit_at(at(9_999)), None);
    // The next window's first line says how many were suppressed, once.
    assert_eq!(limit.admit_at(at(10_000)), Some(101));
    assert_eq!(limit.admit_at(at(10_001)), Some(0));
    assert_eq!(limit.admit_at(at(10_002)), Some(0));
    assert_eq!(limit.admit_at(at(10_003)), None);
    // A window opens at the first line after the last one expired, not on a fixed grid.
    assert_eq!(limit.admit_at(at(60_000)), Some(1));
    assert_eq!((limit.admitted(), limit.suppressed()), (7, 102));
}

#[test]
fn a_zero_burst_suppresses_everything() {
    let limit = RateLimit::new(0, Duration::from_millis(1));
    let t0 = Instant::now();
    for i in 0..10 {
        assert_eq!(limit.admit_at(t0 + Duration::from_secs(i)), None);
    }
    assert_eq!((limit.admitted(), limit.suppressed()), (0, 10));
}

#[test]
fn time_going_backwards_does_not_panic() {
    let limit = RateLimit::new(1, Duration::from_secs(1));
    let t0 = Instant::now() + Duration::from_secs(5);
    assert_eq!(limit.admit_at(t0), Some(0));
    assert_eq!(limit.admit_at(t0 - Duration::from_secs(3)), None);
}

#[test]
fn concurrent_callers_share_one_budget() {
    let limit = RateLimit::new(5, Duration::from_secs(3600));
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..1000 {
                    let _ = limit.admit();
                }
            });
        }
    });
    assert_eq!((limit.admitted(), limit.suppressed()), (5, 3995));
}

fn flood_one_site(n: usize) {
    for i in 0..n {
        crate::warn_limited!("ratelimit-test-per-site flood line {i}");
    }
}

#[test]
fn each_call_site_logs_at_most_its_burst() {
    capture::install();
    flood_one_site(1000);
    // Another call site has a budget of its own.
    for _ in 0..3 {
        crate::warn_limited!("ratelimit-test-other-site");
    }
    let lines = capture::lines_with("ratelimit-test-per-site");
    assert_eq!(lines.len(), DEFAULT_BURST as usize, "{lines:?}");
    assert_eq!(lines[0], "ratelimit-test-per-site flood line 0");
    assert_eq!(capture::lines_with("ratelimit-test-other-site").len(), 3);
}

#[test]
fn the_next_line_says_how_many_were_suppressed() {
    capture::install();
    let limit = RateLimit::new(1, Duration::from_millis(50));
    for i in 0..5 {
        crate::log_limited!(&limit, warn, "ratelimit-test-suppressed {i}");
    }
    std::thread::sleep(Duration::from_millis(100));
    crate::log_limited!(&limit, warn, "ratelimit-test-suppressed last");
    let lines = capture::lines_with("ratelimit-test-suppressed");
    // Every line logged is one the limit admitted, and the suppressed counts the lines carry
    // add up to what it held back (however the windows fell on a loaded machine).
    assert_eq!(lines.len() as u64, limit.admitted(), "{lines:?}");
    let said: u64 = lines
        .iter()
        .filter_map(|l| l.split(" (").nth(1))
        .map(|s| {
            s.trim_end_matches(" similar messages suppressed)")
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(said, limit.suppressed(), "{lines:?}");
    if limit.suppressed() == 4 {
        assert_eq!(
            lines,
            [
                "ratelimit-test-suppressed 0",
                "ratelimit-test-suppressed last (4 similar messages suppressed)"
            ]
        );
    }
}
