//! The `outpost-webhook` binary: parses flags and hands over to the library.

use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Parser as _;
use outpost_webhook::{
    cli::{Cli, Command, PolicyCommand},
    offline,
    policy::{DEFAULT_POLICY_YAML, Policy},
};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Mutate {
            file,
            policy,
            output,
        } => {
            let policy = load_policy(policy.as_deref())?;
            let input = read_input(file.as_deref())?;
            let result = offline::run(&policy, &input, output)?;
            for w in &result.outcome.warnings {
                eprintln!("warning: {w}");
            }
            if let Some(note) = offline::note(&result.outcome) {
                eprintln!("{note}");
            }
            std::io::stdout()
                .write_all(result.stdout.as_bytes())
                .context("writing to stdout")?;
        }
        Command::Policy(PolicyCommand::Check { file }) => {
            let policy = Policy::load(&file)?;
            println!("{}: ok, {} rule(s)", policy.source(), policy.rule_count());
        }
        Command::Policy(PolicyCommand::Default) => print!("{DEFAULT_POLICY_YAML}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn load_policy(path: Option<&Path>) -> anyhow::Result<Policy> {
    Ok(match path {
        Some(p) => Policy::load(p)?,
        None => Policy::builtin()?,
    })
}

fn read_input(file: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match file {
        Some(p) if p != Path::new("-") => {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        }
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read stdin")?;
            Ok(buf)
        }
    }
}
