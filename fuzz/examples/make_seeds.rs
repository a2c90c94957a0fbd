//! Writes the seed corpora to `fuzz/seeds/<target>/`, after checking that each seed passes
//! its harness. Run from anywhere: `cargo +nightly run --manifest-path fuzz/Cargo.toml
//! --example make_seeds`.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut failed = 0;
    for (name, run, seeds) in vmm_fuzz::TARGETS {
        let target_dir = dir.join(name);
        let _ = fs::remove_dir_all(&target_dir);
        fs::create_dir_all(&target_dir).expect("creating the seed directory");
        let mut total = 0;
        let seeds = seeds();
        for (seed, data) in &seeds {
            if catch_unwind(AssertUnwindSafe(|| run(data))).is_err() {
                eprintln!("{name}/{seed}: the harness failed on its own seed");
                failed += 1;
            }
            fs::write(target_dir.join(seed), data).expect("writing a seed");
            total += data.len();
        }
        println!("{name}: {} seeds, {total} bytes", seeds.len());
    }
    if failed > 0 {
        eprintln!("{failed} seed(s) fail their harness");
        std::process::exit(1);
    }
}
