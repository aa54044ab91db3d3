#!/usr/bin/env bash
# Builds what bindings/bench/bench.py needs in the dev profile (the profile CI's wheel uses, so
# the Rust client and the binding are compared like for like), installs the binding into the
# venv bindings/run-tests.sh uses, and prints the JSON of one run.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
venv=$CARGO_TARGET_DIR/bindings/venv
cargo build --bins -p keyway-relay -p keyway-hub -p keyway-cli
cargo build -p keyway-ffi --example bench_rust
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q maturin==1.16.0
MATURIN_PEP517_ARGS="--profile dev" "$venv/bin/pip" install -q --force-reinstall --no-deps ./bindings/python
KEYWAY_BIN_DIR=$CARGO_TARGET_DIR/debug "$venv/bin/python" bindings/bench/bench.py
