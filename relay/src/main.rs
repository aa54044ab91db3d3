//! `keyway-relay`: the command-line front of the relay library (see `keyway_relay::cli`).

fn main() -> std::process::ExitCode {
    keyway_relay::cli::main()
}
