#!/usr/bin/env bash
# The binding tests (keyway-ffi): builds the FFI library and its pinned uniffi-bindgen, then
#  - Python: builds the wheel people install (maturin: py3-none-manylinux_2_34, debug info
#    stripped, versioned from the workspace) from the workspace's dev build, installs it into a
#    fresh venv whose PATH has no cargo, and runs pytest against a real keyway-relay and
#    keyway-hub, then the example app (bindings/python/examples/app.py);
#  - Kotlin: generated bindings (from the wheel's very library) compiled with kotlinc (npm
#    `kotlin-compiler`, whose lib/ has kotlinx-coroutines-core-jvm.jar) against Debian's JNA,
#    and a `main` test (pair, connect, echo, logs) and the example app run on the JVM against a
#    real relay and hub;
#  - Swift: bindings generated (no Swift toolchain here to compile them).
# Installs what it needs (pip: maturin, pytest; npm: kotlin-compiler into the target dir; apt:
# libjna-java). Reuses the workspace's cargo target (dev profile), so after `cargo test
# --workspace` only keyway-ffi (relinked without debug info) and the bindgen are new. With
# CI=true nothing is skipped.
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

step "building the relay, hub and CLI binaries, and uniffi-bindgen"
# The same units as `cargo test --workspace` (a no-op right after it in .ci/run).
cargo build --workspace --bins --tests
cargo build -p keyway-ffi --features bindgen --bin uniffi-bindgen
export KEYWAY_BIN_DIR=$bins
version=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "keyway-ffi"))')

step "python: building the wheel (maturin, dev profile)"
if [ ! -x "$work/build-venv/bin/python" ]; then
    python3 -m venv "$work/build-venv"
fi
"$work/build-venv/bin/pip" install -q "maturin==$MATURIN_VERSION"
rm -rf "$work/wheels"
# The dev profile (opt-level 1, dependencies 2) reuses the build above: one build serves the
# tests and the wheel. pyproject.toml strips the debug info and fixes the manylinux tag; a
# release wheel is the same command with --release (docs/bindings-python.md).
(cd bindings/python && "$work/build-venv/bin/maturin" build --profile dev --out "$work/wheels" --quiet)
wheel=$(echo "$work/wheels"/keyway-*.whl)
expected="keyway-$version-py3-none-manylinux_2_34_$(uname -m).whl"
[ "$(basename "$wheel")" = "$expected" ] || { echo "error: built $(basename "$wheel"), expected $expected" >&2; exit 1; }

step "python: installing $(basename "$wheel") into a fresh venv without cargo"
venv=$work/wheel-venv
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q pytest
"$venv/bin/pip" install -q --no-index "$wheel"
# What an app's machine has: the system's PATH and the venv, no Rust toolchain.
clean_path="$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
for tool in cargo rustc maturin; do
    if found=$(PATH=$clean_path command -v "$tool"); then
        echo "error: $tool is on the test venv's PATH ($found)" >&2
        exit 1
    fi
done
lib=$("$venv/bin/python" -c 'import pathlib, keyway._ffi as f; print(pathlib.Path(f.__file__).parent / "libkeyway_ffi.so")')
if readelf -S --wide "$lib" | grep -q '\.debug_'; then
    echo "error: $lib carries debug info" >&2
    exit 1
fi
echo "wheel $(du -k "$wheel" | cut -f1) KiB, library $(du -k "$lib" | cut -f1) KiB"
said=$(PATH=$clean_path "$venv/bin/python" -m keyway --version)
[ "$said" = "keyway $version" ] || { echo "error: python -m keyway --version said '$said', not 'keyway $version'" >&2; exit 1; }
pyrun() { (cd bindings/python && env -u CARGO_HOME -u RUSTUP_HOME PATH="$clean_path" KEYWAY_WHEEL_VENV="$venv" "$@"); }

step "python: pytest against the installed wheel"
pyrun "$venv/bin/python" -m pytest -q tests

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
"$bins/uniffi-bindgen" generate --library "$lib" --language kotlin \
    --config bindings/uniffi.toml --out-dir "$work/kotlin-gen" --no-format
"$kotlinc" -nowarn -cp "$jna:$coroutines" -include-runtime -d "$work/kotlin-test.jar" \
    "$work/kotlin-gen/dev/keyway/keyway_ffi.kt" bindings/kotlin/test/Main.kt bindings/kotlin/example/App.kt \
    "$work/Readme.kt"
step "kotlin: running the test on the JVM"
java -Djna.library.path="$(dirname "$lib")" -cp "$work/kotlin-test.jar:$jna:$coroutines" dev.keyway.test.MainKt

step "swift: generating the bindings (no Swift toolchain on this machine)"
rm -rf "$work/swift"
"$bins/uniffi-bindgen" generate --library "$lib" --language swift \
    --config bindings/uniffi.toml --out-dir "$work/swift" --no-format
for f in Keyway.swift KeywayFFI.h KeywayFFI.modulemap; do
    [ -s "$work/swift/$f" ] || { echo "error: swift binding $f was not generated" >&2; exit 1; }
done

step "done"
