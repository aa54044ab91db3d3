//! The `keyway` binary (see [`keyway_cli`]).
fn main() -> std::process::ExitCode {
    keyway_cli::main()
}
