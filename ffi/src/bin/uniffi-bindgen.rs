//! The binding generator of the pinned uniffi version, built from this workspace so that the
//! Kotlin, Swift and Python code it writes always matches the library's uniffi contract
//! (a separately installed `uniffi-bindgen` of another version would fail the checksums at
//! load time). maturin runs it for the Python wheel; `bindings/run-tests.sh` for Kotlin.

fn main() {
    uniffi::uniffi_bindgen_main()
}
