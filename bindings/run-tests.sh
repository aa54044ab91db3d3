#!/usr/bin/env bash
# The binding tests (keyway-ffi): builds the FFI library and its pinned uniffi-bindgen, then
#  - Python: `pip install ./bindings/python` (maturin, dev profile) into a venv, and pytest
#    against a real keyway-relay and keyway-hub;
#  - Kotlin: generated bindings compiled with kotlinc (npm `kotlin-compiler`, whose lib/ has
#    kotlinx-coroutines-core-jvm.jar) against Debian's JNA, and a `main` test (pair, connect,
#    echo) run on the JVM against a real relay and hub;
#  - Swift: bindings generated (no Swift toolchain here to compile them).
# Installs what it needs (pip: maturin, pytest; npm: kotlin-compiler into the target dir; apt:
# libjna-java). Reuses the workspace's cargo target (dev profile), so after `cargo test
# --workspace` only keyway-ffi and the bindgen are new. With CI=true nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
target=$CARGO_TARGET_DIR
bins=$target/debug
work=$target/bindings
mkdir -p "$work"
started=$(date +%s)
step() { echo "== bindings: $* (at $(($(date +%s) - started)) s)"; }

# Pinned tool versions (uniffi itself is pinned in ffi/Cargo.toml).
MATURIN_VERSION=1.16.0
KOTLIN_VERSION=2.4.20

step "building the relay, hub and CLI binaries, the FFI library and uniffi-bindgen"
# The same units as `cargo test --workspace` (a no-op right after it in .ci/run).
cargo build --workspace --bins --tests
cargo build -p keyway-ffi --features bindgen --bin uniffi-bindgen
# Last, so that debug/libkeyway_ffi.so is the library an app ships (without the bindgen feature).
cargo build -p keyway-ffi --lib
export KEYWAY_BIN_DIR=$bins

step "python: pip install ./bindings/python"
if [ ! -x "$work/venv/bin/python" ]; then
    python3 -m venv "$work/venv"
fi
"$work/venv/bin/pip" install -q "maturin==$MATURIN_VERSION" pytest
# The dev profile reuses the workspace's build; a user's plain `pip install` builds release.
MATURIN_PEP517_ARGS="--profile dev" "$work/venv/bin/pip" install -q --force-reinstall --no-deps ./bindings/python
step "python: pytest"
(cd bindings/python && "$work/venv/bin/python" -m pytest -q tests)

step "kotlin: installing kotlinc and JNA"
kotlinc=$work/kotlin/node_modules/kotlin-compiler/bin/kotlinc
if [ ! -x "$kotlinc" ]; then
    npm install --prefix "$work/kotlin" --no-audit --no-fund --silent "kotlin-compiler@$KOTLIN_VERSION"
fi
jna=/usr/share/java/jna.jar
if [ ! -f "$jna" ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjna-java
    else
        echo "error: $jna is missing (apt-get install libjna-java) and not root" >&2
        exit 1
    fi
fi
coroutines=$work/kotlin/node_modules/kotlin-compiler/lib/kotlinx-coroutines-core-jvm.jar

step "kotlin: generating and compiling the bindings"
rm -rf "$work/kotlin-gen" "$work/kotlin-test.jar"
# The README's Kotlin snippet, compiled and run by Main.kt as it is written there.
{
    echo "package dev.keyway.test"
    awk '/^```kotlin/ { inside = 1; next } /^```/ { inside = 0 } inside' README.md
} >"$work/Readme.kt"
grep -q "suspend fun readmeExample" "$work/Readme.kt" || { echo "error: no Kotlin snippet in README.md" >&2; exit 1; }
"$bins/uniffi-bindgen" generate --library "$bins/libkeyway_ffi.so" --language kotlin \
    --config bindings/uniffi.toml --out-dir "$work/kotlin-gen" --no-format
"$kotlinc" -nowarn -cp "$jna:$coroutines" -include-runtime -d "$work/kotlin-test.jar" \
    "$work/kotlin-gen/dev/keyway/keyway_ffi.kt" bindings/kotlin/test/Main.kt "$work/Readme.kt"
step "kotlin: running the test on the JVM"
java -Djna.library.path="$bins" -cp "$work/kotlin-test.jar:$jna:$coroutines" dev.keyway.test.MainKt

step "swift: generating the bindings (no Swift toolchain on this machine)"
rm -rf "$work/swift"
"$bins/uniffi-bindgen" generate --library "$bins/libkeyway_ffi.so" --language swift \
    --config bindings/uniffi.toml --out-dir "$work/swift" --no-format
for f in Keyway.swift KeywayFFI.h KeywayFFI.modulemap; do
    [ -s "$work/swift/$f" ] || { echo "error: swift binding $f was not generated" >&2; exit 1; }
done

step "done"
