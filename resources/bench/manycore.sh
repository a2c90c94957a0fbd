#!/usr/bin/env bash
# The many-core sweep of docs/benchmarks.md in one go, in under 8 minutes on a 16-core host:
# guest RAM of 16 and 32 GiB; anon, thp, memfd in one file, memfd in 1 GiB shards, memfd-thp;
# 1, 2, 4, 8 and 16 threads. `vmm pin-bench --json` draws the scaling curves (how fast RAM is
# faulted in, thread count by thread count); `vmm run --report` boots the probe guest for time
# to ready and teardown (the report's `exit` phase) at the two ends of the thread range.
# On a host with more than one NUMA node it then sweeps the nodes (below).
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
#   NUMA_NODES  the host nodes of the NUMA sweep, as pin-bench --numa-nodes takes them
#               [every online node with CPUs and memory, when there are two or more; else
#               the sweep is skipped and host.json says why]. Set, it runs even on one node:
#               NUMA_NODES=0,0 checks the step on a one-node host (two zones on node 0)
#   NUMA_SIZE   guest RAM of the NUMA sweep, G or M, split equally across NUMA_NODES [the
#               largest of SIZES]
#   NODE_DIR    where the nodes are read, for testing this script only: vmm itself always
#               reads /sys [/sys/devices/system/node]
#
# The NUMA sweep (anon RAM, populate, `auto` threads; files under numa/): for each node N,
# pin-bench --host-numa-node N of one zone's share under `taskset` to N's CPUs (the node's
# local fill rate: its memory, its CPUs, all of them); then pin-bench --numa-nodes NUMA_NODES
# (every zone at once, each bound to its node and filled on its CPUs); then `vmm run` with one
# `--memory-zone id=memI,size=SHARE,host_numa_node=N` per node, whose report gives each zone's
# rate and placement. summary.txt puts each zone's rate against its node's local rate (target:
# 0.8 or more) and gives its placement (target: 100%).
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
# (the NUMA sweep's runs are costed as anon at their thread counts, and take their share of
# the same budget)
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
NODE_DIR=${NODE_DIR:-/sys/devices/system/node}

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

# A kernel list (`0-3,8`) as words.
expand_list() {
    local part parts i out=()
    IFS=, read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        part=${part//[[:space:]]/}
        [ -n "$part" ] || continue
        if [[ $part == *-* ]]; then
            for ((i = ${part%-*}; i <= ${part#*-}; i++)); do out+=("$i"); done
        else
            out+=("$part")
        fi
    done
    echo "${out[*]}"
}

# --- the NUMA sweep's nodes ------------------------------------------------------------------
node_cpus() { cat "$NODE_DIR/node$1/cpulist" 2>/dev/null | tr -d '[:space:]'; }
node_mem_kib() { sed -n 's/.*MemTotal:[[:space:]]*\([0-9]*\) kB.*/\1/p' "$NODE_DIR/node$1/meminfo" 2>/dev/null; }
host_nodes=()
for n in $(expand_list "$(cat "$NODE_DIR/online" 2>/dev/null)"); do
    if [ -n "$(node_cpus "$n")" ] && [ "$(node_mem_kib "$n")" -gt 0 ] 2>/dev/null; then
        host_nodes+=("$n")
    fi
done
numa_note=""
if [ -n "${NUMA_NODES:-}" ]; then
    IFS=, read -ra numa_list <<<"$NUMA_NODES"
    for n in "${numa_list[@]}"; do
        if ! [[ $n =~ ^[0-9]+$ ]] || [ -z "$(node_cpus "$n")" ]; then
            echo "manycore.sh: NUMA_NODES: \`$n\` is not a node with CPUs under $NODE_DIR; give some of: ${host_nodes[*]:-none}" >&2
            exit 2
        fi
    done
elif [ "${#host_nodes[@]}" -ge 2 ]; then
    numa_list=("${host_nodes[@]}")
    NUMA_NODES=$(IFS=,; echo "${numa_list[*]}")
else
    numa_list=()
    numa_note="NUMA sweep skipped: this host has ${#host_nodes[@]} NUMA node(s) with CPUs and memory (${host_nodes[*]:-none}, under $NODE_DIR); a node's local rate against a zone's needs two or more (NUMA_NODES=0,0 runs the step on one node, to check it)"
fi
numa_unique=()
if [ "${#numa_list[@]}" -gt 0 ]; then
    mapfile -t numa_unique < <(printf '%s\n' "${numa_list[@]}" | sort -nu)
fi

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
    echo "  \"host_numa_nodes\": $(json_str "$(IFS=,; echo "${host_nodes[*]}")"),"
    echo "  \"numa_nodes\": $(json_str "${NUMA_NODES:-}"),"
    notes=()
    [ -z "$memfd_thp_note" ] || notes+=("$(json_str "$memfd_thp_note")")
    [ -z "$numa_note" ] || notes+=("$(json_str "$numa_note")")
    echo "  \"notes\": [$(IFS=,; echo "${notes[*]}")]"
    echo "}"
} >"$OUT/host.json"
log "host: $(nproc) CPUs, ${cpu_model:-unknown}, $((${mem_kib:-0} / 1048576)) GiB, Linux $(uname -r), THP $(thp_word enabled), shmem $(thp_word shmem_enabled)"
if [ -n "$numa_note" ]; then log "$numa_note"; fi

# --- the plan: one line per configuration, with its estimated cost and runs ----------------
max_mib=0
for s in "${size_list[@]}"; do
    m=$(to_mib "$s")
    if ((m > max_mib)); then max_mib=$m; fi
done
max_threads=${thread_list[-1]}
NUMA_SIZE=${NUMA_SIZE:-${max_mib}M}
numa_zone_mib=0
if [ "${#numa_list[@]}" -gt 0 ]; then
    # Whole 2 MiB pages per zone, as pin-bench splits them.
    numa_zone_mib=$(($(to_mib "$NUMA_SIZE") / ${#numa_list[@]} / 2 * 2))
    if ((numa_zone_mib < 2)); then
        echo "manycore.sh: NUMA_SIZE $NUMA_SIZE is too small for ${#numa_list[@]} zones" >&2
        exit 2
    fi
fi
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
    # The NUMA sweep: each node alone on its CPUs, then every zone at once (all CPUs).
    if [ "${#numa_list[@]}" -gt 0 ]; then
        all=0
        for n in "${numa_unique[@]}"; do
            cpus=$(wc -w <<<"$(expand_list "$(node_cpus "$n")")")
            all=$((all + cpus))
            echo "numa-node$n $numa_zone_mib anon $cpus"
        done
        echo "numa-zones $((numa_zone_mib * ${#numa_list[@]})) anon $all"
        echo "numa-run $((numa_zone_mib * ${#numa_list[@]})) anon $all"
    fi
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
        if (kind ~ /run$/ && v ~ /^memfd/) rt *= 0.8
        return gib / rt + gib * td[v] + (kind ~ /run$/ ? 0.5 : 0)
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
        if ($1 ~ /^numa-(node|zones)/) left -= 0.4
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

# --- NUMA: each node's local fill rate, then every node at once in zones -------------------
numa_zone_args=()
for i in "${!numa_list[@]}"; do
    numa_zone_args+=(--memory-zone "id=mem$i,size=${numa_zone_mib}M,host_numa_node=${numa_list[$i]}")
done
if [ "${#numa_list[@]}" -gt 0 ]; then mkdir -p "$OUT/numa"; fi
while IFS=$'\t' read -r kind mib v t est runs; do
    case $kind in numa-*) ;; *) continue ;; esac
    est1=${est%.*}
    est1=$((est1 + 1))
    k=$runs status=ok ok_runs=0 t0=$SECONDS
    if ((SECONDS > planned + 10)); then k=1 status="behind schedule: 1 run"; fi
    planned=$((planned + est1 * runs))
    case $kind in
    numa-node*)
        n=${kind#numa-node}
        file="$OUT/numa/local-node$n.json"
        cmd=(taskset -c "$(node_cpus "$n")" "$VMM" pin-bench --host-numa-node "$n")
        ;;
    numa-zones)
        file="$OUT/numa/zones.json"
        cmd=("$VMM" pin-bench --numa-nodes "$NUMA_NODES")
        ;;
    numa-run) cmd=() ;;
    esac
    if [ "$kind" != numa-run ]; then
        if ((est1 * k > $(left))); then
            k=1
            ((est1 <= $(left))) || { k=0 status="skipped: ${est1} s estimated, $(left) s left"; }
        fi
        if ((k > 0)); then
            log "$kind: pin-bench ${mib}M anon, auto threads: $k run(s), about $((est1 * k)) s"
            rc=0
            timeout -s INT -k 15 "$(limit)" "${cmd[@]}" --memory "${mib}M" --backing anon \
                --pin populate --threads auto --runs "$k" --warmup 0 --json \
                </dev/null >"$file" 2>>"$OUT/log.txt" || rc=$?
            if [ "$rc" != 0 ]; then
                status=$(failed "$rc")
                log "$kind: $status"
                rm -f "$file"
            else
                ok_runs=$k
            fi
        fi
    else
        log "numa-run: vmm run with ${#numa_list[@]} zones of ${numa_zone_mib}M on nodes $NUMA_NODES: $k run(s), about $((est1 * k)) s"
        for ((r = 1; r <= k; r++)); do
            if ((est1 > $(left))); then
                status="stopped after $ok_runs run(s): ${est1} s estimated, $(left) s left"
                break
            fi
            report="$OUT/numa/run-r$r.json"
            rc=0
            timeout -s INT -k 15 "$(limit)" "$VMM" run "${numa_zone_args[@]}" \
                --user-device none --pin populate --pin-threads auto \
                --report "$report" --quiet --timeout 300 </dev/null >/dev/null 2>>"$OUT/log.txt" || rc=$?
            if [ "$rc" != 0 ]; then
                status="run $r $(failed "$rc")"
                log "numa-run: $status"
                rm -f "$report"
                break
            fi
            ok_runs=$((ok_runs + 1))
        done
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$mib" "$v" "$t" "$runs" "$ok_runs" "$est1" \
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

# The NUMA sweep: each zone's rate against its node's local rate, and its placement.
def load(path):
    return json.load(open(path)) if os.path.exists(path) else None

def pct(on, sampled):
    return round(100.0 * on / sampled, 1) if sampled else None

numa = None
if host.get("numa_nodes"):
    local = {}
    for path in glob.glob(os.path.join(out, "numa", "local-node*.json")):
        node = int(os.path.basename(path)[len("local-node"):-len(".json")])
        rep = json.load(open(path))
        r, p = rep["results"][0], rep["placement"]
        on = sum(pages for n, pages in p["per_node"] if n == node)
        local[node] = {"median_gibps": r["median_gibps"], "best_gibps": r["best_gibps"],
                       "threads": r["threads"], "decided_by": r["decided_by"],
                       "placement_percent": pct(on, p["sampled"])}
    def against(node, gibps):
        base = local.get(node, {}).get("median_gibps")
        return round(gibps / base, 2) if base and gibps is not None else None
    bench = load(os.path.join(out, "numa", "zones.json"))
    zones = []
    for z in (bench["results"][0].get("zones", []) if bench else []):
        pl = z.get("placement") or {}
        zones.append({"id": z["id"], "host_numa_node": z["host_numa_node"],
                      "threads": z["threads"], "decided_by": z["decided_by"],
                      "median_gibps": z["median_gibps"],
                      "of_local": against(z["host_numa_node"], z["median_gibps"]),
                      "placement_percent": pct(pl.get("placement_on_node", 0),
                                               pl.get("placement_sampled", 0))})
    reports = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "numa", "run-r*.json")))]
    vm_zones = []
    if reports:
        last = reports[-1]
        pins = {z["id"]: z for z in (last.get("pin") or {}).get("zones", [])}
        for z in last["vm"]["zones"]:
            rates = [zz["gibps"] for r in reports for zz in (r.get("pin") or {}).get("zones", [])
                     if zz["id"] == z["id"]]
            gibps = round(statistics.median(rates), 2) if rates else None
            vm_zones.append({"id": z["id"], "host_numa_node": z["host_numa_node"],
                             "threads": pins.get(z["id"], {}).get("threads"),
                             "decided_by": pins.get(z["id"], {}).get("decided_by"),
                             "median_gibps": gibps,
                             "of_local": against(z["host_numa_node"], gibps),
                             "placement_percent": pct(z["placement_on_node"], z["placement_sampled"])})
    numa = {"nodes": host["numa_nodes"], "local": {str(k): v for k, v in sorted(local.items())},
            "pin_bench_zones": zones, "vmm_run_zones": vm_zones, "vmm_runs": len(reports)}

summary = {"host": host, "elapsed_s": elapsed, "curves": list(curves.values()),
           "runs": runs, "numa": numa, "steps_not_ok": not_ok}
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
if numa:
    print(f"\nNUMA, nodes {numa['nodes']}: anon, populate, auto threads; a node alone on its own CPUs "
          f"(local), then every zone at once")
    print(f"{'node':>4} {'local GiB/s':>11} {'threads':>7} {'placement':>9}")
    for node, l in numa["local"].items():
        print(f"{node:>4} {l['median_gibps']:11.2f} {l['threads']:>7} "
              f"{str(l['placement_percent']) + '%':>9}")
    met = True
    for title, rows in (("pin-bench --numa-nodes", numa["pin_bench_zones"]),
                        (f"vmm run --memory-zone, {numa['vmm_runs']} run(s)", numa["vmm_run_zones"])):
        print(f"{title}: each zone against its node's local rate")
        print(f"  {'zone':<6} {'node':>4} {'GiB/s':>7} {'threads':>7} {'decided_by':<11} "
              f"{'of local':>8} {'placement':>9}")
        if not rows:
            print("  (none: see steps.tsv and log.txt)")
            met = False
        for z in rows:
            g = f"{z['median_gibps']:7.2f}" if z["median_gibps"] is not None else f"{'-':>7}"
            o = f"{z['of_local']:8.2f}" if z["of_local"] is not None else f"{'-':>8}"
            p = f"{z['placement_percent']}%" if z["placement_percent"] is not None else "-"
            print(f"  {z['id']:<6} {z['host_numa_node']:>4} {g} {str(z['threads']):>7} "
                  f"{str(z['decided_by']):<11} {o} {p:>9}")
            if z["of_local"] is None or z["of_local"] < 0.8 or z["placement_percent"] != 100.0:
                met = False
    print("target (every zone >= 0.8 of its node's local rate, 100% placement): "
          + ("met" if met else "NOT met"))
for s in not_ok:
    print(f"not ok: {s['kind']} {s['mib']}M {s['variant']} t{s['threads']}: {s['status']}")
PY
