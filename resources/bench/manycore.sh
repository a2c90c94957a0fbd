#!/usr/bin/env bash
# The many-core sweep of docs/benchmarks.md in one go, in under 8 minutes on a 16-core host:
# guest RAM of 16 and 32 GiB; anon, thp, memfd in one file, memfd in 1 GiB shards, memfd-thp;
# 1, 2, 4, 8 and 16 threads. `vmm pin-bench --json` draws the scaling curves (how fast RAM is
# faulted in, thread count by thread count); `vmm run --report` boots the probe guest for time
# to ready and teardown (the report's `exit` phase) at the two ends of the thread range.
#
#   manycore.sh VMM OUT       VMM: a vmm binary (static, to run it on another machine), with
#                                  the vmm-bench binary beside it (`vmm pin-bench` runs it)
#                             OUT: a folder for host.json, plan.tsv, steps.tsv, pin/, run/,
#                                  summary.json and summary.txt
#
# Environment (defaults in brackets):
#   SIZES       guest RAM sizes, G or M [16G,32G]
#   THREADS     thread counts of the curves [1,2,4,8,16]
#   VM_THREADS  thread counts booted with `vmm run` [the first and last of THREADS]
#   VARIANTS    [anon,thp,memfd-1file,memfd-shards,memfd-thp]
#   RUNS        most measured runs of one configuration [5]
#   BUDGET_S    seconds every measurement together may take [420; the host record, the
#               summary and process start-up stay well inside the other minute]
#   SET_SHMEM   1: as root, set shmem_enabled to `advise` for memfd-thp when it forbids huge
#               pages in shmem, and put the old value back on exit [1]
#   THP_DIR     where shmem_enabled is read and written, for testing this script only: vmm
#               itself always reads /sys [/sys/kernel/mm/transparent_hugepage]
#   DRY_RUN     1: write the host record and the plan with its estimate, measure nothing [0]
#
# How the time is budgeted. Every configuration gets one run; the time left goes to more runs,
# cheapest configuration first, up to RUNS, so the slow ones (1 thread at 32 GiB: 10-16 s a
# run with its teardown) keep one run and the fast ones (16 threads) get up to five. The cost
# of a run is estimated from what docs/benchmarks.md and the sharding work measured on a
# 16-core host (GiB/s when faulting in fresh RAM, by thread count; teardown per GiB):
#   anon 4K       3.4 at 1 thread, 26 at 16               teardown 0.05 s/GiB
#   thp           7.8 at 1, 52 at 16                        teardown 0.01 s/GiB
#   memfd, 1 file about 5 at 16 (one file's locks)          teardown 0.1 s/GiB (3 s at 32 GiB)
#   memfd, shards 12.5 at 16 (measured 12.9-13.4)           teardown 0.1 s/GiB
#   memfd-thp     not measured yet: assumed 5 at 1, 28 at 16 teardown 0.02 s/GiB
# (counts between are interpolated in the table below), `vmm run` of a memfd at 0.8 of that
# (populate, then DMA_MAP to the device server) plus 0.5 s a boot, and 0.4 s to start a
# pin-bench. With the defaults, one run of everything is estimated at about 380 s: 240 s of
# curves and 140 s of boots. The curves cover every thread count once at least; booting every
# thread count too would add about 160 s and break the 8 minutes, which is why `vmm run`
# takes the two ends unless VM_THREADS says otherwise.
#
# A host slower than the estimates cannot overrun the budget: a step that starts behind
# schedule gets one run, one that no longer fits in what is left is skipped (steps.tsv says
# so), and every command runs under `timeout` for the time that is left.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
[ $# -eq 2 ] || usage
VMM=$(readlink -f "$1")
OUT=$2
[ -x "$VMM" ] || { echo "manycore.sh: $1 is not an executable" >&2; exit 2; }
[ -x "$(dirname "$VMM")/vmm-bench" ] || {
    echo "manycore.sh: no vmm-bench beside $VMM (\`vmm pin-bench\` runs it): cargo build --release builds both into one folder; copy both" >&2
    exit 2
}
if [ -e "$OUT/steps.tsv" ]; then
    # The summary reads every file under OUT: another sweep's would mix in.
    echo "manycore.sh: $OUT already holds a sweep; give an empty or new folder" >&2
    exit 2
fi

SIZES=${SIZES:-16G,32G}
THREADS=${THREADS:-1,2,4,8,16}
VARIANTS=${VARIANTS:-anon,thp,memfd-1file,memfd-shards,memfd-thp}
RUNS=${RUNS:-5}
BUDGET_S=${BUDGET_S:-420}
SET_SHMEM=${SET_SHMEM:-1}
THP_DIR=${THP_DIR:-/sys/kernel/mm/transparent_hugepage}
DRY_RUN=${DRY_RUN:-0}
IFS=, read -ra size_list <<<"$SIZES"
IFS=, read -ra thread_list <<<"$THREADS"
IFS=, read -ra variant_list <<<"$VARIANTS"
for v in "${variant_list[@]}"; do
    case $v in
    anon | thp | memfd-1file | memfd-shards | memfd-thp) ;;
    *) echo "manycore.sh: VARIANTS: \`$v\`: give anon, thp, memfd-1file, memfd-shards, memfd-thp" >&2; exit 2 ;;
    esac
done
if [ "${thread_list[0]}" = "${thread_list[-1]}" ]; then
    VM_THREADS=${VM_THREADS:-${thread_list[0]}}
else
    VM_THREADS=${VM_THREADS:-${thread_list[0]},${thread_list[-1]}}
fi
IFS=, read -ra vm_thread_list <<<"$VM_THREADS"

mkdir -p "$OUT/pin" "$OUT/run"
OUT=$(readlink -f "$OUT")
log() { printf '[%4ds] %s\n' "$SECONDS" "$*" | tee -a "$OUT/log.txt" >&2; }

to_mib() {
    local v=${1^^}
    case $v in
    *G) echo $((${v%G} * 1024)) ;;
    *M) echo $((${v%M})) ;;
    *) echo "manycore.sh: size \`$1\`: give G or M, as 16G" >&2; exit 2 ;;
    esac
}

# `vmm run` splits RAM above 3 GiB at the 32-bit hole, and a shard must be a power of two no
# larger than a RAM range: the fewest memfds it allows is with the largest such power (16 GiB
# of RAM is 3 GiB + 13 GiB, so 8 GiB shards: 3 memfds). pin-bench maps one range, so there
# the size itself gives one memfd.
one_file_shard_mib() {
    local s=$1 low high big p=1
    low=$((s < 3072 ? s : 3072))
    high=$((s > 3072 ? s - 3072 : 0))
    big=$((low > high ? low : high))
    while ((p * 2 <= big)); do p=$((p * 2)); done
    echo "$p"
}

json_str() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"
}

thp_word() { sed -n 's/.*\[\([^]]*\)\].*/\1/p' "$THP_DIR/$1" 2>/dev/null || true; }

# --- memfd-thp needs shmem_enabled to allow huge pages -------------------------------------
shmem_before=$(thp_word shmem_enabled)
shmem_changed=0
restore_shmem() {
    if [ "$shmem_changed" = 1 ]; then
        echo "$shmem_before" >"$THP_DIR/shmem_enabled" &&
            log "shmem_enabled put back to $shmem_before"
        shmem_changed=0
    fi
}
trap restore_shmem EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
memfd_thp_note=""
if [[ ",$VARIANTS," == *,memfd-thp,* ]]; then
    case $shmem_before in
    always | within_size | advise | force) ;;
    *)
        if [ "$DRY_RUN" = 1 ]; then
            log "shmem_enabled is [$shmem_before]: a sweep would set it to advise for memfd-thp"
        elif [ "$SET_SHMEM" = 1 ] && [ "$(id -u)" = 0 ] && [ -w "$THP_DIR/shmem_enabled" ]; then
            shmem_changed=1
            echo advise >"$THP_DIR/shmem_enabled"
            log "shmem_enabled was [$shmem_before]: set to advise for memfd-thp, put back on exit"
        else
            memfd_thp_note="memfd-thp skipped: $THP_DIR/shmem_enabled is [$shmem_before] and this script may not change it (that needs root, a writable file and SET_SHMEM=1)"
            log "$memfd_thp_note"
            variant_list=("${variant_list[@]/memfd-thp/}")
        fi
        ;;
    esac
fi

# --- the host -------------------------------------------------------------------------------
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem_kib=$(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\).*/\1/p' /proc/meminfo)
{
    echo "{"
    echo "  \"date\": $(json_str "$(date -u '+%Y-%m-%d %H:%M:%SZ')"),"
    echo "  \"nproc\": $(nproc),"
    echo "  \"cpus_online\": $(getconf _NPROCESSORS_ONLN),"
    echo "  \"cpu_model\": $(json_str "${cpu_model:-unknown}"),"
    echo "  \"memory_bytes\": $((${mem_kib:-0} * 1024)),"
    echo "  \"kernel\": $(json_str "$(uname -r)"),"
    echo "  \"hypervisor\": $(grep -qw hypervisor /proc/cpuinfo && echo true || echo false),"
    echo "  \"thp_enabled\": $(json_str "$(thp_word enabled)"),"
    echo "  \"thp_defrag\": $(json_str "$(thp_word defrag)"),"
    echo "  \"thp_shmem_enabled_before\": $(json_str "$shmem_before"),"
    echo "  \"thp_shmem_enabled_used\": $(json_str "$(thp_word shmem_enabled)"),"
    echo "  \"vmm\": $(json_str "$VMM"),"
    echo "  \"sizes\": $(json_str "$SIZES"),"
    echo "  \"threads\": $(json_str "$THREADS"),"
    echo "  \"vm_threads\": $(json_str "$VM_THREADS"),"
    echo "  \"variants\": $(json_str "$VARIANTS"),"
    echo "  \"runs_at_most\": $RUNS,"
    echo "  \"budget_s\": $BUDGET_S,"
    echo "  \"notes\": [$([ -n "$memfd_thp_note" ] && json_str "$memfd_thp_note")]"
    echo "}"
} >"$OUT/host.json"
log "host: $(nproc) CPUs, ${cpu_model:-unknown}, $((${mem_kib:-0} / 1048576)) GiB, Linux $(uname -r), THP $(thp_word enabled), shmem $(thp_word shmem_enabled)"

# --- the plan: one line per configuration, with its estimated cost and runs ----------------
max_mib=0
for s in "${size_list[@]}"; do
    m=$(to_mib "$s")
    if ((m > max_mib)); then max_mib=$m; fi
done
max_threads=${thread_list[-1]}
{
    for s in "${size_list[@]}"; do
        for v in "${variant_list[@]}"; do
            [ -n "$v" ] || continue
            for t in "${thread_list[@]}"; do echo "pin $(to_mib "$s") $v $t"; done
        done
    done
    for s in "${size_list[@]}"; do
        for v in "${variant_list[@]}"; do
            [ -n "$v" ] || continue
            for t in "${vm_thread_list[@]}"; do echo "run $(to_mib "$s") $v $t"; done
        done
    done
} | awk -v runs="$RUNS" -v budget="$BUDGET_S" -v warm_mib="$max_mib" -v warm_t="$max_threads" '
    function rate(v, t,    i, lo, hi) {
        # GiB/s at thread counts 1 2 4 8 16, interpolated in log2(threads) between them.
        if (t >= 16) return r[v, 5]
        for (i = 1; i < 5; i++) {
            lo = 2 ^ (i - 1); hi = 2 ^ i
            if (t >= lo && t < hi)
                return r[v, i] + (r[v, i + 1] - r[v, i]) * (log(t / lo) / log(2))
        }
        return r[v, 1]
    }
    function cost(kind, mib, v, t,    gib, rt) {
        gib = mib / 1024
        rt = rate(v, t)
        if (kind == "run" && v ~ /^memfd/) rt *= 0.8
        return gib / rt + gib * td[v] + (kind == "run" ? 0.5 : 0)
    }
    BEGIN {
        split("3.4 6.5 12 20 26", a); for (i = 1; i <= 5; i++) r["anon", i] = a[i]
        split("7.8 15 28 45 52", a); for (i = 1; i <= 5; i++) r["thp", i] = a[i]
        split("2.5 3.5 4.5 5 5", a); for (i = 1; i <= 5; i++) r["memfd-1file", i] = a[i]
        split("2.5 4.8 8.5 11 12.5", a); for (i = 1; i <= 5; i++) r["memfd-shards", i] = a[i]
        split("5 9 16 24 28", a); for (i = 1; i <= 5; i++) r["memfd-thp", i] = a[i]
        td["anon"] = 0.05; td["thp"] = 0.01; td["memfd-1file"] = 0.1
        td["memfd-shards"] = 0.1; td["memfd-thp"] = 0.02
        # The warm-up (first touch of the largest size), and starting each pin-bench.
        left = budget - cost("pin", warm_mib, "anon", warm_t) - 0.4
    }
    {
        n++; kind[n] = $1; mib[n] = $2; v[n] = $3; t[n] = $4
        est[n] = cost($1, $2, $3, $4); k[n] = 1; left -= est[n]
        if ($1 == "pin" && !seen[$2, $3]++) left -= 0.4
    }
    END {
        once = budget - left
        # More runs, cheapest configuration first, while the budget lasts.
        for (round = 2; round <= runs; round++)
            for (pass = 1; pass <= n; pass++) {
                best = 0
                for (i = 1; i <= n; i++)
                    if (k[i] < round && !done[round, i] && (best == 0 || est[i] < est[best])) best = i
                if (best == 0) break
                done[round, best] = 1
                if (est[best] <= left) { k[best]++; left -= est[best] }
            }
        for (i = 1; i <= n; i++) printf "%s\t%d\t%s\t%s\t%.2f\t%d\n", kind[i], mib[i], v[i], t[i], est[i], k[i]
        printf "# estimated: %.0f s for one run of everything and the warm-up, %.0f s in all, of %d s\n", once, budget - left, budget > "/dev/stderr"
    }
' >"$OUT/plan.tsv" 2>"$OUT/plan.note"
log "plan: $(wc -l <"$OUT/plan.tsv") configurations, $(sed 's/^# //' "$OUT/plan.note")"
if [ "$DRY_RUN" = 1 ]; then
    column -t "$OUT/plan.tsv" 2>/dev/null || cat "$OUT/plan.tsv"
    exit 0
fi
printf 'kind\tmib\tvariant\tthreads\tplanned_runs\truns\test_s\tsecs\tstatus\n' >"$OUT/steps.tsv"

# Seconds of budget left, and the limit every command runs under: what is left, at least 1
# (`timeout 0` would mean none).
left() { echo $((BUDGET_S - SECONDS)); }
limit() { echo $((BUDGET_S - SECONDS > 0 ? BUDGET_S - SECONDS : 1)); }
failed() { # status -> words for steps.tsv
    if [ "$1" = 124 ]; then echo "stopped at the end of the budget"; else echo "failed (status $1): see log.txt"; fi
}

backing_args() { # variant mib kind -> vmm arguments for the backing
    case $1 in
    anon | thp) echo "--backing $1" ;;
    memfd-1file) [ "$3" = pin ] && echo "--backing memfd --memory-shard $2M" ||
        echo "--backing memfd --memory-shard $(one_file_shard_mib "$2")M" ;;
    memfd-shards) echo "--backing memfd" ;;
    memfd-thp) echo "--backing memfd-thp" ;;
    esac
}

# --- the warm-up: the host's first touch of this much memory is not what is measured --------
log "warm-up: pin-bench anon ${max_mib}M, $max_threads threads, 1 run (discarded)"
rc=0
timeout -s INT -k 15 "$(limit)" "$VMM" pin-bench --memory "${max_mib}M" --backing anon \
    --threads "$max_threads" --runs 1 --warmup 0 --json \
    </dev/null >"$OUT/pin/warmup.json" 2>>"$OUT/log.txt" || rc=$?
if [ "$rc" != 0 ]; then log "warm-up failed (status $rc), going on"; fi
planned=$SECONDS # when the plan expects the current step to start

# --- the curves: one pin-bench per size, variant and run count ------------------------------
while read -r mib v; do
    # Thread counts with the same planned runs share one pin-bench (interleaved run by run).
    while read -r runs; do
        threads=$(awk -F'\t' -v m="$mib" -v v="$v" -v r="$runs" \
            '$1 == "pin" && $2 == m && $3 == v && $6 == r { printf "%s%s", s, $4; s = "," }' "$OUT/plan.tsv")
        est1=$(awk -F'\t' -v m="$mib" -v v="$v" -v r="$runs" \
            '$1 == "pin" && $2 == m && $3 == v && $6 == r { e += $5 } END { printf "%d", e + 1.4 }' "$OUT/plan.tsv")
        k=$runs status=ok t0=$SECONDS
        if ((SECONDS > planned + 10)); then k=1 status="behind schedule: 1 run"; fi
        planned=$((planned + est1 * runs))
        if ((est1 > $(left))); then
            status="skipped: ${est1} s estimated, $(left) s left"
            k=0
        else
            file="$OUT/pin/${mib}M-$v-t${threads//,/-}.json"
            log "pin-bench ${mib}M $v threads $threads: $k run(s), about $((est1 * k)) s"
            rc=0
            # shellcheck disable=SC2046 # backing_args gives several words on purpose
            timeout -s INT -k 15 "$(limit)" "$VMM" pin-bench --memory "${mib}M" \
                $(backing_args "$v" "$mib" pin) --pin populate --threads "$threads" \
                --runs "$k" --warmup 0 --json </dev/null >"$file" 2>>"$OUT/log.txt" || rc=$?
            if [ "$rc" != 0 ]; then
                status=$(failed "$rc")
                log "pin-bench ${mib}M $v $status"
                rm -f "$file"
                k=0
            fi
        fi
        for t in ${threads//,/ }; do
            printf 'pin\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mib" "$v" "$t" "$runs" "$k" \
                "$est1" "$((SECONDS - t0))" "$status" >>"$OUT/steps.tsv"
        done
    done < <(awk -F'\t' -v m="$mib" -v v="$v" '$1 == "pin" && $2 == m && $3 == v { print $6 }' "$OUT/plan.tsv" | sort -un)
done < <(awk -F'\t' '$1 == "pin" && !seen[$2 FS $3]++ { print $2, $3 }' "$OUT/plan.tsv")

# --- run and teardown: the probe guest booted by `vmm run` ----------------------------------
while IFS=$'\t' read -r kind mib v t est runs; do
    [ "$kind" = run ] || continue
    est1=${est%.*}
    est1=$((est1 + 1))
    k=$runs status=ok ok_runs=0 t0=$SECONDS
    if ((SECONDS > planned + 10)); then k=1 status="behind schedule: 1 run"; fi
    planned=$((planned + est1 * runs))
    case $v in
    anon | thp) device="--user-device none --pin populate" ;;
    *) device="--user-device epf" ;;
    esac
    log "vmm run ${mib}M $v $t threads: $k run(s), about $((est1 * k)) s"
    for ((r = 1; r <= k; r++)); do
        if ((est1 > $(left))); then
            status="stopped after $ok_runs run(s): ${est1} s estimated, $(left) s left"
            break
        fi
        report="$OUT/run/${mib}M-$v-t$t-r$r.json"
        rc=0
        # shellcheck disable=SC2046,SC2086 # word splitting of the argument lists is meant
        timeout -s INT -k 15 "$(limit)" "$VMM" run --memory "${mib}M" \
            $(backing_args "$v" "$mib" run) $device --pin-threads "$t" \
            --report "$report" --quiet --timeout 300 </dev/null >/dev/null 2>>"$OUT/log.txt" || rc=$?
        if [ "$rc" != 0 ]; then
            status="run $r $(failed "$rc")"
            log "vmm run ${mib}M $v $t: $status"
            rm -f "$report"
            break
        fi
        ok_runs=$((ok_runs + 1))
    done
    printf 'run\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mib" "$v" "$t" "$runs" "$ok_runs" "$est1" \
        "$((SECONDS - t0))" "$status" >>"$OUT/steps.tsv"
done <"$OUT/plan.tsv"

restore_shmem
log "measurements done in $SECONDS s (budget $BUDGET_S s)"

# --- the summary ------------------------------------------------------------------------------
if ! command -v python3 >/dev/null; then
    log "python3 not found: no summary.json; the raw JSON is under $OUT/pin and $OUT/run"
    exit 0
fi
python3 - "$OUT" "$SECONDS" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, statistics, sys

out, elapsed = sys.argv[1], int(sys.argv[2])
host = json.load(open(os.path.join(out, "host.json")))

def name(mib):
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"

curves = {}
for path in sorted(glob.glob(os.path.join(out, "pin", "*M-*.json"))):
    base = os.path.basename(path)
    mib, variant = base.split("M-", 1)[0], base.split("M-", 1)[1].rsplit("-t", 1)[0]
    report = json.load(open(path))
    entry = curves.setdefault((int(mib), variant), {
        "memory_bytes": report["memory_bytes"], "variant": variant,
        "backing": report["backing"], "shards": report["shards"],
        "shard_bytes": report["shard_bytes"], "memset_gibps": report["memset_gibps"],
        "threads": {}})
    for r in report["results"]:
        entry["threads"][r["requested"]] = {
            "threads_used": r["threads"], "decided_by": r["decided_by"],
            "runs_gibps": r["runs_gibps"], "median_gibps": r["median_gibps"],
            "best_gibps": r["best_gibps"]}

def phase(report, name):
    return sum(p["end_ms"] - p["start_ms"] for p in report["phases"] if p["name"] == name)

def stats(values):
    return {"median": round(statistics.median(values), 1), "best": round(min(values), 1),
            "runs": [round(v, 1) for v in values]} if values else None

boots = {}
for path in sorted(glob.glob(os.path.join(out, "run", "*.json"))):
    base = os.path.basename(path)[:-len(".json")]
    rest, _run = base.rsplit("-r", 1)
    rest, threads = rest.rsplit("-t", 1)
    mib, variant = rest.split("M-", 1)
    report = json.load(open(path))
    boots.setdefault((int(mib), variant, int(threads)), []).append(report)

runs = []
for (mib, variant, threads), reports in sorted(boots.items()):
    pin = [r["pin"] for r in reports if r.get("pin")]
    vm = reports[-1]["vm"]
    runs.append({
        "memory_bytes": mib << 20, "variant": variant, "pin_threads": threads,
        "backing": vm["backing"], "memory_shards": vm["memory_shards"],
        "shard_bytes": vm["shard_bytes"],
        "huge_bytes": [r["vm"]["huge_bytes"] for r in reports],
        "threads_used": pin[-1]["threads"] if pin else None,
        "pin_backend": pin[-1]["backend"] if pin else None,
        "ready_ms": stats([r["guest"]["ready_ms"] for r in reports if r["guest"].get("ready_ms")]),
        "teardown_ms": stats([phase(r, "exit") for r in reports]),
        "pin_ms": stats([phase(r, "pin") for r in reports]),
        "pin_gibps_median": round(statistics.median(p["gibps"] for p in pin), 2) if pin else None,
    })

steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    head = f.readline().rstrip("\n").split("\t")
    steps = [dict(zip(head, line.rstrip("\n").split("\t"))) for line in f]
not_ok = [s for s in steps if s["status"] != "ok"]

summary = {"host": host, "elapsed_s": elapsed, "curves": list(curves.values()),
           "runs": runs, "steps_not_ok": not_ok}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")

print(f"{host['nproc']} CPUs, {host['cpu_model']}, {host['memory_bytes'] >> 30} GiB, "
      f"Linux {host['kernel']}, THP {host['thp_enabled']}, shmem {host['thp_shmem_enabled_used']} "
      f"(was {host['thp_shmem_enabled_before']}); {elapsed} s of measurements")
for note in host["notes"]:
    print(f"note: {note}")
threads = sorted({t for c in curves.values() for t in c["threads"]}, key=int)
print("\npin-bench, populate: median (best) GiB/s by threads")
print(f"{'size':<6} {'variant':<13} {'memfds':>6}  " + "  ".join(f"{t:>13}" for t in threads))
for (mib, variant), c in sorted(curves.items()):
    cells = []
    for t in threads:
        r = c["threads"].get(t)
        cells.append(f"{r['median_gibps']:6.2f} ({r['best_gibps']:5.2f})" if r else f"{'-':>13}")
    print(f"{name(mib):<6} {variant:<13} {c['shards']:>6}  " + "  ".join(cells))
print("\nvmm run: time to ready and teardown, ms, median (best) of n runs")
print(f"{'size':<6} {'variant':<13} {'threads':>7} {'memfds':>6} {'n':>2} "
      f"{'ready':>19} {'teardown':>19} {'pin GiB/s':>9}")
for r in runs:
    fmt = lambda s: f"{s['median']:9.1f} ({s['best']:7.1f})" if s else f"{'-':>19}"
    n = len(r["ready_ms"]["runs"]) if r["ready_ms"] else 0
    print(f"{name(r['memory_bytes'] >> 20):<6} {r['variant']:<13} {r['pin_threads']:>7} "
          f"{r['memory_shards']:>6} {n:>2} {fmt(r['ready_ms'])} {fmt(r['teardown_ms'])} "
          f"{r['pin_gibps_median'] if r['pin_gibps_median'] is not None else '-':>9}")
for s in not_ok:
    print(f"not ok: {s['kind']} {s['mib']}M {s['variant']} t{s['threads']}: {s['status']}")
PY
