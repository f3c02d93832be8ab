//! The HTTP shell: admission on TLS, health and metrics on plain HTTP, reloads, graceful drain.
//!
//! Does network I/O. The request flow reads top to bottom in `mutate`: check the content type
//! and size, read the body within the apiserver's deadline, parse the review, run the pure core
//! on the policy in force, answer. [`router`] is the whole admission surface and is tested
//! in-process; [`start`] adds the sockets.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use rustls::ServerConfig;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::{
    admission,
    metrics::{self, Outcome},
    mutate::{ObjectKind, Verdict},
    policy::{Policy, PolicyError},
    state::{App, Limits, PolicyStore},
    tls::{self, CertStore, TlsError},
};

/// The admission path, as registered in the MutatingWebhookConfiguration.
pub const MUTATE_PATH: &str = "/mutate";
/// The default admission port (TLS); the Service maps 443 to it.
pub const DEFAULT_PORT: u16 = 8443;
/// The default health and metrics port (plain HTTP).
pub const DEFAULT_HEALTH_PORT: u16 = 8080;
/// The registration's `timeoutSeconds`, and the request deadline when the apiserver sends no
/// `?timeout=`: past it the apiserver has given up on the call anyway.
pub const TIMEOUT_SECONDS: u64 = 5;

/// How the server is run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    pub health_addr: SocketAddr,
    /// How often certificate and policy files are polled.
    pub reload_interval: Duration,
    /// How long requests are still served after SIGTERM, with readiness failing.
    pub drain: Duration,
    /// How long in-flight requests may take to finish after the drain.
    pub shutdown_grace: Duration,
    /// How long a client may take to send its request headers.
    pub header_timeout: Duration,
    /// How long a client may take to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files, polled for changes (a Secret volume, or cert-manager's).
    Files { cert: PathBuf, key: PathBuf },
    /// A development CA and certificate for localhost, generated at start; the CA bundle is
    /// written to `ca_out` for clients.
    Development { ca_out: PathBuf },
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    pub certs: CertSource,
    /// Verify client certificates against this CA bundle.
    pub client_ca: Option<PathBuf>,
    /// The policy file; the built-in policy when `None`.
    pub policy: Option<PathBuf>,
    pub limits: Limits,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot write the development CA bundle to {path}: {source}")]
    WriteCa {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot read: {source}")]
    ReadClientCa {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Loads the certificate and the policy and builds the shared state. Fails (and the process
/// exits) when either is unusable at start: there is no old one to keep.
///
/// # Errors
/// When the certificate, client CA or policy cannot be loaded.
pub fn prepare(config: &Config) -> Result<(Arc<App>, Arc<ServerConfig>), ServeError> {
    let provider = tls::provider();
    let certs = match &config.certs {
        CertSource::Files { cert, key } => CertStore::from_files(provider, cert, key)?,
        CertSource::Development { ca_out } => {
            let generated =
                tls::generate(&["localhost".into(), "127.0.0.1".into(), "::1".into()], 30)?;
            if let Some(dir) = ca_out.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::write(ca_out, &generated.ca_pem).map_err(|source| ServeError::WriteCa {
                path: ca_out.display().to_string(),
                source,
            })?;
            warn!(
                ca_bundle = %ca_out.display(),
                "No --tls-cert/--tls-key: serving a generated certificate for localhost and \
                 127.0.0.1, signed by the CA in ca_bundle. For development only"
            );
            CertStore::from_pem(
                provider,
                generated.cert_pem.as_bytes(),
                generated.key_pem.as_bytes(),
            )?
        }
    };
    let certs = Arc::new(certs);
    let client_ca = match &config.client_ca {
        Some(path) => Some((
            std::fs::read(path).map_err(|source| ServeError::ReadClientCa {
                path: path.display().to_string(),
                source,
            })?,
            path.display().to_string(),
        )),
        None => None,
    };
    let tls = tls::server_config(
        Arc::clone(&certs),
        client_ca
            .as_ref()
            .map(|(pem, path)| (pem.as_slice(), path.as_str())),
    )?;
    let policy = match &config.policy {
        Some(path) => PolicyStore::from_file(path)?,
        None => PolicyStore::fixed(Policy::builtin()?),
    };
    info!(
        policy = policy.current().source(),
        rules = policy.current().rule_count(),
        certificate_not_after = certs.not_after(),
        client_verification = config.client_ca.is_some(),
        "Loaded"
    );
    Ok((Arc::new(App::new(policy, certs, config.limits)), tls))
}

/// Serves until `shutdown` resolves, then drains and stops. This is `outpost-webhook serve`.
///
/// # Errors
/// When the server cannot start.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let (app, tls) = prepare(&config)?;
    let running = start(config.settings, app, tls).await?;
    shutdown.await;
    running.shutdown();
    running.wait().await;
    Ok(())
}

/// The admission surface: `POST /mutate`, with JSON errors for everything else.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(app)
}

/// The plain-HTTP surface for the kubelet and Prometheus.
pub fn health_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(app)
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn method_not_allowed(State(app): State<Arc<App>>, req: Request) -> Response {
    let message = format!("{} is not allowed here; use POST", req.method());
    reject(
        &app,
        Instant::now(),
        &Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        ),
    )
}

async fn not_found(State(app): State<Arc<App>>, req: Request) -> Response {
    let message = format!(
        "no such path {}; admission is served at {MUTATE_PATH}",
        req.uri().path()
    );
    reject(
        &app,
        Instant::now(),
        &Rejection::new(StatusCode::NOT_FOUND, "not_found", message),
    )
}

/// A request answered with a 4xx: its status, a reason for metrics, and a message for people.
struct Rejection {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl Rejection {
    fn new(code: StatusCode, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
        }
    }
}

/// A 4xx with a JSON body shaped like a Kubernetes `Status`, which the apiserver logs verbatim.
fn reject(app: &App, started: Instant, r: &Rejection) -> Response {
    app.metrics.bad_request(r.reason, started.elapsed());
    warn!(status = r.code.as_u16(), reason = r.reason, detail = %r.message, "Rejected a request");
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "code": r.code.as_u16(), "reason": r.reason, "message": r.message,
    });
    (
        r.code,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The apiserver sends its own deadline as `?timeout=10s` (a Go duration).
fn timeout_param(query: Option<&str>) -> Option<Duration> {
    let value = query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("timeout="))?;
    parse_go_duration(value).filter(|d| !d.is_zero())
}

/// Parses Go durations, as the apiserver writes them: `10s`, `1m0s`, `500ms`, `1.5s`.
/// `None` when the text is not a duration.
#[must_use]
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(split);
        let value: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let seconds = match unit {
            "h" => value * 3600.0,
            "m" => value * 60.0,
            "s" => value,
            "ms" => value / 1e3,
            "us" | "µs" => value / 1e6,
            "ns" => value / 1e9,
            _ => return None,
        };
        total += Duration::try_from_secs_f64(seconds).ok()?;
        rest = next;
    }
    Some(total)
}

/// `POST /mutate`: read the review, run the core on the policy in force, answer.
async fn mutate(State(app): State<Arc<App>>, req: Request) -> Response {
    let started = Instant::now();
    match read_review(&app, req).await {
        Ok(request) => answer(&app, &request, started),
        Err(rejection) => reject(&app, started, &rejection),
    }
}

/// Checks the content type and size, reads the body within the apiserver's deadline, and
/// parses the `AdmissionReview`.
async fn read_review(app: &App, req: Request) -> Result<admission::Request, Rejection> {
    let (parts, body) = req.into_parts();
    if !is_json(&parts.headers) {
        let got = parts
            .headers
            .get(header::CONTENT_TYPE)
            .map_or("none".into(), |v| {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            });
        let message = format!("Content-Type must be application/json, got {got}");
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        ));
    }
    let limit = app.limits.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > limit as u64) {
        // Refused before a byte of the body is read.
        let message = format!("body of {len} bytes is over the limit of {limit} bytes");
        return Err(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            message,
        ));
    }
    let deadline = timeout_param(parts.uri.query()).unwrap_or(app.limits.default_timeout);
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let inner = e.into_inner();
            return Err(
                if inner
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    let message = format!("body is over the limit of {limit} bytes");
                    Rejection::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
                } else {
                    let message = format!("cannot read the body: {inner}");
                    Rejection::new(StatusCode::BAD_REQUEST, "bad_shape", message)
                },
            );
        }
        Err(_) => {
            let message = format!("the body did not arrive within {deadline:?}");
            return Err(Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                message,
            ));
        }
    };
    admission::parse(&bytes)
        .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, e.reason(), e.to_string()))
}

/// Runs the core in one span per review, counts, logs and answers 200.
fn answer(app: &App, request: &admission::Request, started: Instant) -> Response {
    let span = info_span!(
        "review",
        uid = %request.uid,
        operation = request.operation_str(),
        kind = %request.kind.kind,
        namespace = request.namespace.as_deref().unwrap_or(""),
        name = %request.name,
        dry_run = request.dry_run,
        ops = tracing::field::Empty,
        duration_us = tracing::field::Empty,
    );
    let _entered = span.enter();
    let policy = app.policy.current();
    let outcome = admission::decide(&policy, request);
    let body = admission::response(&request.uid, &outcome);

    let elapsed = started.elapsed();
    let kind = ObjectKind::from_gvk(
        &request.kind.group,
        &request.kind.version,
        &request.kind.kind,
    );
    app.metrics.request(
        metrics::kind_index(kind),
        metrics::operation_index(Some(request.operation_str())),
        Outcome::from(outcome.verdict),
        elapsed,
    );
    app.metrics
        .answered(outcome.ops.len(), outcome.warnings.len());
    let duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    // Object contents are never logged, at any level: env values in them may be secrets.
    let verdict = outcome.verdict.as_str();
    match outcome.verdict {
        Verdict::Patched => info!(
            verdict,
            ops = outcome.ops.len(),
            warnings = outcome.warnings.len(),
            duration_us,
            "Mutated"
        ),
        Verdict::Unfixable => warn!(
            verdict, warnings = ?outcome.warnings, duration_us, "Allowed unchanged: cannot fix"
        ),
        Verdict::Skipped | Verdict::Unchanged => debug!(verdict, duration_us, "Allowed unchanged"),
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from(body),
    )
        .into_response()
}

/// A running server: its bound addresses, its state, and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub app: Arc<App>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Begins the graceful shutdown: readiness fails at once, requests are served for the drain
    /// period, then idle connections close and in-flight requests finish.
    pub fn shutdown(&self) {
        self.app.start_draining();
        let _ = self.stop.send(true);
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) {
        if let Err(e) = self.task.await {
            error!(error = %e, "The server task failed");
        }
    }
}

/// Binds both listeners and serves until [`Running::shutdown`].
///
/// # Errors
/// When a listener cannot be bound.
pub async fn start(
    settings: Settings,
    app: Arc<App>,
    tls: Arc<ServerConfig>,
) -> Result<Running, ServeError> {
    let admission = router(Arc::clone(&app));
    start_with(settings, app, tls, admission).await
}

/// As [`start`], serving `admission` on the TLS port: the benchmark's floor server uses it to
/// measure the TLS and HTTP stack alone, with everything else the same.
///
/// # Errors
/// When a listener cannot be bound.
pub async fn start_with(
    settings: Settings,
    app: Arc<App>,
    tls: Arc<ServerConfig>,
    admission: Router,
) -> Result<Running, ServeError> {
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })
    };
    let listener = bind(settings.addr).await?;
    let health = bind(settings.health_addr).await?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: settings.addr,
        source,
    })?;
    let health_addr = health.local_addr().map_err(|source| ServeError::Bind {
        addr: settings.health_addr,
        source,
    })?;
    let (stop, stop_rx) = watch::channel(false);

    let task = tokio::spawn(supervise(
        settings,
        Arc::clone(&app),
        (tls, admission),
        listener,
        health,
        stop_rx,
    ));
    info!(%addr, %health_addr, "Serving admission on TLS and health on HTTP");
    Ok(Running {
        addr,
        health_addr,
        app,
        stop,
        task,
    })
}

async fn supervise(
    settings: Settings,
    app: Arc<App>,
    (tls, admission): (Arc<ServerConfig>, Router),
    listener: TcpListener,
    health: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let reloader = {
        let app = Arc::clone(&app);
        let every = settings.reload_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let app = Arc::clone(&app);
                // File reads are blocking; keep them off the request threads.
                let _ = tokio::task::spawn_blocking(move || app.reload()).await;
            }
        })
    };

    let (health_stop, mut health_stop_rx) = watch::channel(false);
    let health_task = tokio::spawn({
        let router = health_router(Arc::clone(&app));
        async move {
            let served = axum::serve(health, router)
                .with_graceful_shutdown(async move { stopped(&mut health_stop_rx).await })
                .await;
            if let Err(e) = served {
                error!(error = %e, "The health server failed");
            }
        }
    });

    let (accept_stop, accept_stop_rx) = watch::channel(false);
    let accept_task = tokio::spawn(accept_loop(
        settings.clone(),
        Arc::clone(&app),
        (tls, admission),
        listener,
        accept_stop_rx,
    ));

    stopped(&mut stop).await;
    info!(drain = ?settings.drain, "Draining: readiness fails, requests are still served");
    tokio::time::sleep(settings.drain).await;
    let _ = accept_stop.send(true);
    if let Err(e) = accept_task.await {
        error!(error = %e, "The accept loop failed");
    }
    reloader.abort();
    let _ = health_stop.send(true);
    let _ = health_task.await;
    info!("Stopped");
}

/// Resolves once the flag is set (or its sender is gone).
async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

async fn accept_loop(
    settings: Settings,
    app: Arc<App>,
    (tls, router): (Arc<ServerConfig>, Router),
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            app.metrics.connection_refused();
            debug!(%peer, "Refused a connection: --max-connections reached");
            drop(stream);
            continue;
        };
        // Without TCP_NODELAY, headers and body written separately wait on Nagle and the
        // apiserver's delayed ACK: about 40 ms a call instead of about 2.
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let app = Arc::clone(&app);
        let handshake_timeout = settings.handshake_timeout;
        tokio::spawn(
            async move {
                let _permit = permit;
                let tls =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            app.metrics.tls_handshake_failed();
                            debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            app.metrics.tls_handshake_failed();
                            debug!("TLS handshake timed out");
                            return;
                        }
                    };
                app.metrics.connection_opened();
                let conn = builder
                    .serve_connection(TokioIo::new(tls), service)
                    .into_owned();
                if let Err(e) = watcher.watch(conn).await {
                    debug!(error = %e, "connection ended with an error");
                }
                app.metrics.connection_closed();
            }
            .instrument(info_span!("conn", %peer)),
        );
    }
    drop(listener);
    // Idle keep-alive connections close now (the apiserver pools them, kubernetes#127335);
    // in-flight requests finish, within the grace period.
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(grace = ?settings.shutdown_grace, "Connections still open after the grace period");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("1m0s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("x"), None);
        assert_eq!(
            timeout_param(Some("a=b&timeout=5s")),
            Some(Duration::from_secs(5))
        );
        assert_eq!(timeout_param(Some("timeout=0s")), None);
        assert_eq!(timeout_param(None), None);
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(is_json(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&h));
    }
}
