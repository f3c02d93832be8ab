//! The benchmark's floor: outpost-webhook's own TLS and HTTP stack (same accept loop, rustls
//! configuration, ALPN, `TCP_NODELAY` and timeouts) answering `POST /mutate` with a constant
//! AdmissionReview response. What `serve` costs above this is the cost of reviewing.
//!
//! `cargo run --release --example floor -- ADDR CERT KEY` (bench/load.sh runs it).

use std::{path::PathBuf, sync::Arc, time::Duration};

use axum::{Router, http::header, routing::post};
use outpost_webhook::{
    core::admission::MUTATE_PATH,
    serve::{self, CertSource, Config, Limits, Settings},
};

const ANSWER: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"0df28fbd-5f5f-11e8-bc74-36e6bb280816","allowed":true}}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: floor ADDR CERT KEY";
    let addr = args.next().ok_or(usage)?.parse()?;
    let cert = PathBuf::from(args.next().ok_or(usage)?);
    let key = PathBuf::from(args.next().ok_or(usage)?);
    let config = Config {
        settings: Settings {
            addr,
            health_addr: "127.0.0.1:0".parse()?,
            reload_interval: Duration::from_secs(3600),
            drain: Duration::ZERO,
            shutdown_grace: Duration::from_secs(1),
            header_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            max_connections: 1000,
            max_connections_per_peer: 1000,
            max_pending_per_peer: 1000,
            health_max_connections: 32,
            idle_timeout: Duration::from_secs(30),
            max_connection_age: Duration::from_secs(300),
        },
        certs: CertSource::Files { cert, key },
        client_ca: None,
        policy: None,
        limits: Limits {
            max_body_bytes: 6 << 20,
            max_inflight_bytes: 64 << 20,
            default_timeout: Duration::from_secs(5),
        },
        cluster: outpost_webhook::cluster::Settings::off(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (app, tls) = serve::prepare(&config)?;
        // The body is read, as the webhook must, then a constant answer.
        let constant = Router::new().route(
            MUTATE_PATH,
            post(|_body: axum::body::Bytes| async {
                ([(header::CONTENT_TYPE, "application/json")], ANSWER)
            }),
        );
        let running = serve::start_with(config.settings, Arc::clone(&app), tls, constant).await?;
        println!("floor listening on {}", running.addr);
        tokio::signal::ctrl_c().await?;
        running.shutdown();
        running.wait().await;
        Ok(())
    })
}
