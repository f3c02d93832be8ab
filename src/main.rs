//! The `outpost-webhook` binary: parses flags and hands over to the library.

use std::process::ExitCode;

use clap::Parser as _;
use outpost_webhook::cmd::{self, Cli};

fn main() -> ExitCode {
    match cmd::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each error keeps one source, so the chain names every cause once.
            let code = e.exit_code();
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::from(code)
        }
    }
}
