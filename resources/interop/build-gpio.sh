#!/usr/bin/env bash
# Builds a vfio-user server that is not part of this project, for the interoperability test
# (tests/interop.rs): the `gpio` example of the crates.io package `vfio_user` (by the Cloud
# Hypervisor authors): PCI function 494f:0dc8 whose only BAR is a 256-byte I/O BAR (BAR2),
# with INTx only.
#
# Usage: resources/interop/build-gpio.sh [DEST]   (default: .interop/gpio at the repository root)
#
# The package comes from the registry through cargo only: a throwaway project that depends on
# it is `cargo fetch`ed, the package's source is copied out of cargo's registry cache into a
# temporary directory and its example is built there with the package's own Cargo.lock. Nothing
# of it enters this repository but the binary at DEST (which is git-ignored by default).
#
# Environment (optional): VFIO_USER_VERSION (default 0.1.7), KEEP_TMP=1 keeps the build dir.
set -euo pipefail

say() { printf 'build-gpio: %s\n' "$*"; }
die() { printf 'build-gpio: error: %s\n' "$*" >&2; exit 1; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
DEST=${1:-$REPO_ROOT/.interop/gpio}
VERSION=${VFIO_USER_VERSION:-0.1.7}
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}

command -v cargo >/dev/null || die "'cargo' not found; install Rust (rustup) first"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/build-gpio.XXXXXX")
if [ "${KEEP_TMP:-0}" != 1 ]; then
    trap 'rm -rf "$TMP"' EXIT
fi

# 1. Fetch the package through a throwaway project.
mkdir -p "$TMP/fetch/src"
cat >"$TMP/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-vfio-user"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
vfio_user = "=$VERSION"

[workspace]
TOML
: >"$TMP/fetch/src/lib.rs"
say "fetching vfio_user $VERSION"
(cd "$TMP/fetch" && cargo fetch -q) \
    || die "cargo fetch of vfio_user $VERSION failed (see cargo's output above: is that version published, and is the crates.io registry or its mirror reachable?)"

# 2. Copy its source out of cargo's cache (the cache is read-only by convention).
SRC=$(find "$CARGO_HOME/registry/src" -mindepth 2 -maxdepth 2 -type d -name "vfio_user-$VERSION" \
    2>/dev/null | head -n1 || true)
[ -n "$SRC" ] || die "vfio_user-$VERSION was fetched but is not under $CARGO_HOME/registry/src"
[ -f "$SRC/examples/gpio/main.rs" ] || die "$SRC has no examples/gpio/main.rs (package layout changed?)"
cp -r "$SRC" "$TMP/vfio_user"
# A package copied into another git tree or workspace must stay its own workspace.
grep -q '^\[workspace\]' "$TMP/vfio_user/Cargo.toml" || printf '\n[workspace]\n' >>"$TMP/vfio_user/Cargo.toml"

# 3. Build the example with the package's own lock file, in its own target directory.
say "building the gpio example (release)"
(cd "$TMP/vfio_user" && CARGO_TARGET_DIR="$TMP/target" cargo build -q --release --locked --example gpio) \
    || die "building the gpio example of vfio_user $VERSION failed (see cargo's output above)"
BIN="$TMP/target/release/examples/gpio"
[ -x "$BIN" ] || die "cargo succeeded but $BIN is missing"

mkdir -p "$(dirname "$DEST")" || die "cannot create the directory of $DEST"
cp "$BIN" "$DEST" || die "cannot copy the server to $DEST"
say "built $DEST (vfio_user $VERSION, example gpio)"
