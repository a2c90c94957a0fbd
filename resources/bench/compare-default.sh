#!/usr/bin/env bash
# Side by side: the default `vmm run` (the probe guest and its epf device, no other argument) of
# two vmm binaries, alternated so that both see the same machine load, with the time to the
# guest's ready mark and the total from each run's --report. Prints best and median of each,
# and NEW's over BASE's.
#
#   compare-default.sh BASE_VMM NEW_VMM [RUNS]     RUNS: runs of each binary [5]
#
# Environment: ARGS  extra arguments for both `vmm run`s [none: the default run]
#              KEEP  a folder to keep every report in [a temporary one, removed]
# Needs python3 to read the reports. A run that fails stops the script (its stderr shown).
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
base=$1 new=$2 runs=${3:-5}
for bin in "$base" "$new"; do
    [[ -x $bin ]] || { echo "compare-default.sh: $bin is not an executable vmm" >&2; exit 2; }
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "compare-default.sh: RUNS must be a positive count" >&2; exit 2; }

out=${KEEP:-}
if [[ -z $out ]]; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out"

# shellcheck disable=SC2086 # ARGS is a word list on purpose.
one() { # NAME BIN I
    local report=$out/$1-$3.json
    if ! "$2" run ${ARGS:-} --report "$report" >/dev/null 2>"$out/$1-$3.err"; then
        echo "compare-default.sh: $2 run failed:" >&2
        cat "$out/$1-$3.err" >&2
        exit 1
    fi
}

for i in $(seq 1 "$runs"); do
    # Alternate which goes first, so neither always runs right after the other's teardown.
    if ((i % 2)); then
        one base "$base" "$i"
        one new "$new" "$i"
    else
        one new "$new" "$i"
        one base "$base" "$i"
    fi
done

python3 - "$out" "$runs" <<'EOF'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
stats = {}
for name in ("base", "new"):
    reports = [json.load(open(f"{out}/{name}-{i}.json")) for i in range(1, runs + 1)]
    ready = [r["guest"]["ready_ms"] for r in reports]
    total = [r["total_ms"] for r in reports]
    if None in ready:
        sys.exit(f"compare-default.sh: a {name} run has no ready mark")
    stats[name] = {k: (min(v), statistics.median(v), v) for k, v in
                   (("ready", ready), ("total", total))}
print(f"{runs} runs each, interleaved (ms)")
for name in ("base", "new"):
    for k in ("ready", "total"):
        best, med, all_ = stats[name][k]
        print(f"  {name:<4} {k:<5} best {best:7.1f}  median {med:7.1f}  all "
              + " ".join(f"{v:.1f}" for v in all_))
for k in ("ready", "total"):
    b, n = stats["base"][k], stats["new"][k]
    print(f"  new/base {k:<5} best {n[0] / b[0]:.2f}x  median {n[1] / b[1]:.2f}x")
EOF
