//! The `keyway-hub` command line (see [`keyway_hub::cli`]).
fn main() -> std::process::ExitCode {
    keyway_hub::cli::main()
}
