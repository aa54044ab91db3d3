//! The `keyway` command line (see [`keyway_client::cli`]).
fn main() -> std::process::ExitCode {
    keyway_client::cli::main()
}
