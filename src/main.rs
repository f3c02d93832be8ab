//! The `outpost-webhook` binary: parses flags and hands over to the library.

use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser as _;
use outpost_webhook::{
    certs,
    cli::{Cli, Command, PolicyCommand, ServeArgs},
    import, logging, offline,
    policy::{DEFAULT_POLICY_YAML, Policy},
    server::{self, CertSource, Config, Settings},
    state::Limits,
    webhook_config::{self, Target},
};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            // The chain of causes, each once: most messages already carry their cause's text.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
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
        Command::Policy(PolicyCommand::Import { from_json_patches }) => {
            let text = std::fs::read_to_string(&from_json_patches)
                .with_context(|| format!("cannot read {}", from_json_patches.display()))?;
            let patches: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", from_json_patches.display()))?;
            let imported = import::import(&patches, &from_json_patches.display().to_string())?;
            for line in &imported.unsupported {
                eprintln!("not expressible: {line}");
            }
            eprintln!(
                "{} operation(s) expressed, {} not",
                imported.expressed,
                imported.unsupported.len()
            );
            print!("{}", imported.yaml);
        }
        Command::Serve(args) => serve(*args)?,
        Command::WebhookConfig {
            ca_bundle,
            service,
            namespace,
            url,
            namespace_selector,
            failure_policy,
        } => {
            let ca_bundle = match ca_bundle {
                Some(p) => Some(
                    std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?,
                ),
                None => None,
            };
            let target = match url {
                Some(url) => Target::Url(url),
                None => Target::Service {
                    name: service,
                    namespace,
                },
            };
            print!(
                "{}",
                webhook_config::render(&webhook_config::Options {
                    ca_bundle,
                    target,
                    namespace_selector,
                    failure_policy,
                })?
            );
        }
        Command::Certs {
            service,
            namespace,
            out,
            sans,
            days,
        } => {
            for path in certs::write(&service, &namespace, &sans, days, &out)? {
                println!("wrote {}", path.display());
            }
        }
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

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    logging::init(args.log_format, args.log_level);
    let config = Config {
        settings: Settings {
            addr: args.addr,
            health_addr: args.health_addr,
            reload_interval: args.reload_interval,
            drain: Duration::from_secs(args.drain_seconds),
            shutdown_grace: args.shutdown_grace,
            header_timeout: args.header_timeout,
            handshake_timeout: args.handshake_timeout,
            max_connections: args.max_connections,
        },
        certs: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => CertSource::Files { cert, key },
            _ => CertSource::Development {
                ca_out: args.dev_ca_out,
            },
        },
        client_ca: args.client_ca,
        policy: args.policy,
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            default_timeout: args.request_timeout,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let stop = signal().context("cannot install signal handlers")?;
        server::run(config, stop).await?;
        anyhow::Ok(())
    })
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or SIGINT (Ctrl-C).
fn signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}
