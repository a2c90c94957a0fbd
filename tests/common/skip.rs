//! A test that cannot run on this host fails, unless `VMM_TEST_ALLOW_SKIP` names what it needs:
//! a skip is a decision someone wrote down (README, `.ci/run`), never a silent pass.

/// The variable that lets tests that cannot run here pass without running: a comma-separated
/// list of needs (`root`, `cgroup-v1-cpu`, `shmem-without-huge-pages`, `numactl`) or `all`.
pub const ALLOW_SKIP: &str = "VMM_TEST_ALLOW_SKIP";

/// Called by a test that cannot run here, before it returns: `need` names what is missing
/// (one word of [`ALLOW_SKIP`]), `why` says it for a person. Prints a SKIPPED line when
/// [`ALLOW_SKIP`] allows `need`; otherwise the test fails, saying how to allow it.
pub fn skip(need: &str, why: &str) {
    let allowed = std::env::var(ALLOW_SKIP).unwrap_or_default();
    assert!(
        allows(&allowed, need),
        "this test cannot run here: {why}; run it where it can, or set {ALLOW_SKIP}={need} \
         to let it pass without running"
    );
    eprintln!("SKIPPED ({ALLOW_SKIP} allows {need}): {why}");
}

/// Whether the value of [`ALLOW_SKIP`] allows skipping for `need`.
fn allows(allowed: &str, need: &str) -> bool {
    allowed
        .split(',')
        .map(str::trim)
        .any(|w| w == need || w == "all")
}
