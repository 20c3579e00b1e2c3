//! The `outbox-relay` binary: everything lives in the library (`cli::main`).

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
