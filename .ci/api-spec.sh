#!/usr/bin/env bash
# The API spec (docs/api/openapi.yaml) against what is served: the file is valid OpenAPI
# (openapi-spec-validator), and schemathesis drives a real `vmm serve` for a bounded number of
# generated requests, valid and invalid: no answer may be a 5xx, and every answer's status,
# content type and body must be what the spec says. Then the VMM must still answer and end
# cleanly on vmm.shutdown (its socket gone).
#
# vm.boot and vm.reboot are not fuzzed: each would start a guest from whatever config the run
# created last (random memory size, random device sockets), making the run's time and its pass
# depend on the host's RAM and timing; the script boots one small probe guest itself, and
# tests/api.rs boots real VMs through the API. vmm.shutdown is not fuzzed because it ends the
# server; it is sent once at the end instead.
#
# Needs python3 with venv, socat (schemathesis speaks TCP, vmm a Unix socket) and curl;
# builds target/release/vmm if it is missing. VMM_API_SPEC_EXAMPLES sets the examples per
# operation and state (default 200; the whole script takes under a minute here).
set -euo pipefail
cd "$(dirname "$0")/.."

SPEC=$PWD/docs/api/openapi.yaml
VENV=${VMM_CI_VENV:-$HOME/.cache/vmm-ci-venv}
EXAMPLES=${VMM_API_SPEC_EXAMPLES:-200}

if [ ! -x "$VENV/bin/schemathesis" ] || [ ! -x "$VENV/bin/openapi-spec-validator" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q openapi-spec-validator==0.9.0 schemathesis==4.32.5
fi
"$VENV/bin/openapi-spec-validator" "$SPEC"

[ -x target/release/vmm ] || cargo build --release -p vmm 2>&1
dir=$(mktemp -d)
serve_pid=
socat_pid=
cleanup() {
    [ -n "$socat_pid" ] && kill "$socat_pid" 2>/dev/null || true
    [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

sock=$dir/api.sock
target/release/vmm serve --api-socket "$sock" 2>"$dir/serve.log" &
serve_pid=$!
for _ in $(seq 100); do
    [ -S "$sock" ] && break
    kill -0 "$serve_pid" 2>/dev/null || { cat "$dir/serve.log"; echo "vmm serve ended before it listened"; exit 1; }
    sleep 0.1
done
[ -S "$sock" ] || { echo "vmm serve did not create $sock in 10 s"; exit 1; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$sock" &
socat_pid=$!
for _ in $(seq 50); do
    curl -fsS "http://127.0.0.1:$port/api/v1/vmm.ping" >/dev/null 2>&1 && break
    sleep 0.1
done

api() { curl -sS -o /dev/null -w '%{http_code}' --unix-socket "$sock" -X "$1" "http://localhost/api/v1/$2" "${@:3}"; }
fuzz() {
    echo "schemathesis ($1): $EXAMPLES examples per operation"
    shift
    # From the temporary folder, where schemathesis leaves its cache.
    (cd "$dir" && timeout 200 "$VENV/bin/schemathesis" run "$SPEC" \
        --url "http://127.0.0.1:$port/api/v1" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
        --phases examples,coverage,fuzzing --max-examples "$EXAMPLES" --workers 1 --seed 19 \
        --request-timeout 40 --suppress-health-check all --no-color "$@" 2>&1)
}
# Every operation but those that start guests or end the server, in whatever state the
# generated requests leave the VM (mostly none: most generated configs are refused).
fuzz "all states" --exclude-path /vm.boot --exclude-path /vm.reboot --exclude-path /vmm.shutdown
# With a VM there to answer about: Created, then (where this host has KVM) Running, a probe
# guest that stays alive (probe.hang), so vm.info, vm.counters, vm.pause and vm.resume answer
# with their bodies, not 404.
states=(vm.info vm.counters vm.pause vm.resume)
only=()
for op in "${states[@]}"; do only+=(--include-path "/$op"); done
api PUT vm.delete >/dev/null
created=$(api PUT vm.create -H 'Content-Type: application/json' \
    -d '{"memory": {"size": 67108864}, "payload": {"cmdline": "probe.hang"}, "serial": {"mode": "Null"}}')
[ "$created" = 204 ] || { echo "vm.create of a small probe guest answered $created"; exit 1; }
fuzz "VM created" "${only[@]}"
if [ -c /dev/kvm ]; then
    booted=$(api PUT vm.boot)
    [ "$booted" = 204 ] || { echo "vm.boot of a small probe guest answered $booted"; exit 1; }
    # Fuzzed once the guest runs (while it is built, pause and resume answer 409).
    for _ in $(seq 300); do
        info=$(curl -sS --unix-socket "$sock" http://localhost/api/v1/vm.info)
        case $info in *'"phase":"run"'*) break ;; esac
        sleep 0.1
    done
    case $info in
        *'"state":"Running"'*'"phase":"run"'* | *'"phase":"run"'*'"state":"Running"'*) ;;
        *) echo "the probe guest did not reach its run phase in 30 s: $info"; exit 1 ;;
    esac
    fuzz "VM running" "${only[@]}"
    api PUT vm.resume >/dev/null
else
    echo "no /dev/kvm: the Running state is not fuzzed"
fi

# Unharmed: it still answers, and vmm.shutdown ends it with status 0 and no socket left.
pinged=$(api GET vmm.ping)
[ "$pinged" = 200 ] || { echo "vmm.ping after the run answered $pinged"; exit 1; }
ended=$(api PUT vmm.shutdown)
[ "$ended" = 204 ] || { echo "vmm.shutdown answered $ended"; exit 1; }
status=0
wait "$serve_pid" || status=$?
serve_pid=
if [ "$status" != 0 ] || [ -e "$sock" ]; then
    cat "$dir/serve.log"
    echo "vmm serve after vmm.shutdown: exit status $status, socket $([ -e "$sock" ] && echo left || echo removed)"
    exit 1
fi
echo "api spec: valid, and vmm serve answered as it says"
