#!/usr/bin/env bash
# Runs every fuzz target for a while (default 20 s each) from its committed seeds and fails on
# the first crash, leak, timeout or broken invariant. Installs cargo-fuzz if it is missing.
#
#   fuzz/smoke.sh [SECONDS] [TARGET...]
#
# New inputs go to fuzz/corpus/<target>/ (ignored by git); a failing input is saved under
# fuzz/artifacts/<target>/ and the libFuzzer log's tail is printed. See fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^vmm-fuzz$' || true)
fi
# A smoke run that fuzzes nothing must not pass: no target found is a failure, not a success.
if [ ${#targets[@]} -eq 0 ]; then
    echo "smoke.sh: no fuzz target in fuzz/Cargo.toml (its [[bin]] sections' names): nothing to run" >&2
    exit 1
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# One build for all targets (ASan, debug assertions), then the runs.
cargo +nightly fuzz build

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    dict=()
    if [ -f "dicts/$t.dict" ]; then
        dict=("-dict=dicts/$t.dict")
    fi
    log=$(mktemp)
    if cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
        "${dict[@]}" >"$log" 2>&1; then
        echo "$t: $(grep -E '^#[0-9]+.*DONE' "$log" | tail -1 | sed 's/^#\([0-9]*\)\s*DONE\s*/\1 runs, /')"
    else
        echo "$t: FAILED"
        tail -n 60 "$log"
        failed+=("$t")
    fi
    rm -f "$log"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz targets that failed: ${failed[*]}"
    exit 1
fi
