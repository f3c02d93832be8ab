//! The sockets: admission on TLS and health on plain HTTP, connection limits and timeouts, the
//! reload timer, and the graceful drain on shutdown.
//!
//! Does network I/O.

use std::{net::SocketAddr, panic::AssertUnwindSafe, pin::Pin, sync::Arc, time::Duration};

use axum::{Router, http::StatusCode, response::IntoResponse as _};
use futures::FutureExt as _;
use hyper::{Request, body::Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulConnection},
    service::TowerToHyperService,
};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::{
    ServeError, Settings,
    app::App,
    fair::{Activity, Close, Conn, SHED_GRACE, Slot, Table},
    http::{health_router, router},
    metrics::Port as PortName,
};

/// HTTP/2 streams one connection may have open at once. The apiserver opens another connection
/// when it needs more.
pub const H2_MAX_STREAMS: u32 = 8;
/// The HTTP/2 window of one stream: request body bytes a client may send before the handler has
/// read them, so before they are counted in the budget.
pub const H2_STREAM_WINDOW: u32 = 16 * 1024;
/// The HTTP/2 window of a whole connection: unread body bytes across its streams. It holds every
/// stream's full window, so streams that wait for the budget can never use up the window of the
/// one being read: a client that opens many large streams on one connection is answered (200, or
/// 503 when the budget stays full), never stalled into a 408.
pub const H2_CONNECTION_WINDOW: u32 = H2_MAX_STREAMS * H2_STREAM_WINDOW;
/// The largest header block of one HTTP/2 request (the apiserver's are under 1 KiB).
pub const H2_MAX_HEADER_LIST: u32 = 8 * 1024;
/// hyper's HTTP/1 read buffer, which holds the request head.
pub const H1_MAX_BUF: usize = 64 * 1024;
/// hyper's HTTP/1 read buffer on the health port: its requests are a line and a few headers.
pub const HEALTH_MAX_BUF: usize = 16 * 1024;
/// The most one health connection holds: its read buffer and the `/metrics` answer being written.
pub const HEALTH_PER_CONNECTION_BYTES: usize = HEALTH_MAX_BUF + 48 * 1024;
/// What rustls and the TLS stream hold per connection: record buffers both ways.
const TLS_BUFFERS: usize = 48 * 1024;
/// The most one open connection holds outside the budget: its unread HTTP/2 window and the
/// header blocks of its streams (or hyper's HTTP/1 buffer), its TLS buffers, and 2 KiB of state
/// per stream.
#[allow(clippy::cast_possible_truncation, clippy::as_conversions)]
pub const PER_CONNECTION_BYTES: usize = {
    let h2 = H2_CONNECTION_WINDOW as usize
        + H2_MAX_STREAMS as usize * (H2_MAX_HEADER_LIST as usize + 2 * 1024);
    let h1 = H1_MAX_BUF;
    (if h2 > h1 { h2 } else { h1 }) + TLS_BUFFERS
};
/// Connections the kernel queues until they are accepted (capped by `net.core.somaxconn`, 4096 by
/// default). A client that opens a thousand at once must not fill the queue: past it the
/// kernel drops the next SYN, the apiserver's too, and its connect waits a second to retry.
const BACKLOG: u32 = 4096;
/// How often a connection checks whether it is idle or too old.
const CHECK_EVERY: Duration = Duration::from_millis(250);

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
    let bind = |addr| listen(addr).map_err(|source| ServeError::Bind { addr, source });
    let listener = bind(settings.addr)?;
    let health = bind(settings.health_addr)?;
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

/// A listening socket with a backlog of [`BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As TcpListener::bind does: a restarted server may bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
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

    let (accept_stop, accept_stop_rx) = watch::channel(false);
    let health_task = tokio::spawn(accept_loop(
        Port::health(&settings, health_router(Arc::clone(&app))),
        settings.clone(),
        Arc::clone(&app),
        health,
        accept_stop_rx.clone(),
    ));
    let accept_task = tokio::spawn(accept_loop(
        Port::admission(&settings, tls, admission),
        settings.clone(),
        Arc::clone(&app),
        listener,
        accept_stop_rx,
    ));

    stopped(&mut stop).await;
    info!(drain = ?settings.drain, "Draining: readiness fails, requests are still served");
    tokio::time::sleep(settings.drain).await;
    // Both ports close together; each waits at most --shutdown-grace (and a second) for its
    // connections, however many are open, so the process stops well within the kubelet's
    // terminationGracePeriodSeconds.
    let _ = accept_stop.send(true);
    for (port, task) in [("admission", accept_task), ("health", health_task)] {
        if let Err(e) = task.await {
            error!(error = %e, port, "The accept loop failed");
        }
    }
    reloader.abort();
    info!("Stopped");
}

/// Resolves once the flag is set (or its sender is gone).
async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

/// One listening port: its name in metrics, TLS (admission) or none (health), its router, its
/// connection table and how hyper serves it.
struct Port {
    name: PortName,
    tls: Option<TlsAcceptor>,
    router: Router,
    table: Arc<Table>,
    builder: Arc<auto::Builder<TokioExecutor>>,
}

impl Port {
    fn admission(settings: &Settings, tls: Arc<ServerConfig>, router: Router) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_timeout)
            .max_buf_size(H1_MAX_BUF)
            .keep_alive(true);
        // Every buffer a client can fill before the budget counts it is bounded here; see
        // PER_CONNECTION_BYTES. Pings find peers that vanished without a FIN.
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .adaptive_window(false)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_send_buf_size(64 * 1024)
            .keep_alive_interval(Some(Duration::from_secs(10)))
            .keep_alive_timeout(Duration::from_secs(10));
        Self {
            name: PortName::Admission,
            tls: Some(TlsAcceptor::from(tls)),
            router,
            table: Table::new(settings.admission_limits()),
            builder: Arc::new(builder),
        }
    }

    /// The kubelet's probes and Prometheus speak HTTP/1.1; the port has a small budget of its
    /// own, so a flood of it cannot reach admission's memory.
    fn health(settings: &Settings, router: Router) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_timeout)
            .max_buf_size(HEALTH_MAX_BUF)
            .keep_alive(true);
        Self {
            name: PortName::Health,
            tls: None,
            router,
            table: Table::new(settings.health_limits()),
            builder: Arc::new(builder),
        }
    }
}

async fn accept_loop(
    port: Port,
    settings: Settings,
    app: Arc<App>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let port = Arc::new(port);
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
        let admitted = port.table.admit(peer.ip());
        for shed in &admitted.shed {
            app.metrics.shed(port.name, shed.reason, shed.state);
        }
        let Some(slot) = admitted.slot else {
            if port.name == PortName::Admission {
                app.metrics.connection_refused();
            }
            debug!(%peer, port = port.name.as_str(), "Refused a connection: every one that could give way is busy");
            drop(stream);
            continue;
        };
        // Without TCP_NODELAY, headers and body written separately wait on Nagle and the
        // apiserver's delayed ACK: about 40 ms a call instead of about 2.
        let _ = stream.set_nodelay(true);
        let connection = serve_one(
            Arc::clone(&port),
            settings.clone(),
            Arc::clone(&app),
            stream,
            slot,
            stop.clone(),
        );
        let span = info_span!("conn", %peer, port = port.name.as_str());
        spawn_connection(Arc::clone(&app), connection.instrument(span));
    }
    drop(listener);
    // Idle keep-alive connections close now (the apiserver pools them, kubernetes#127335);
    // in-flight requests finish, within the grace period. Every connection task holds a slot.
    let deadline = Instant::now() + settings.shutdown_grace + Duration::from_secs(1);
    while port.table.alive() > 0 {
        if Instant::now() >= deadline {
            warn!(grace = ?settings.shutdown_grace, port = port.name.as_str(), open = port.table.alive(), "Connections still open after the grace period");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connection, from its TLS handshake (on the admission port) to its end. It gives way at
/// once when shed before its handshake is done.
async fn serve_one(
    port: Arc<Port>,
    settings: Settings,
    app: Arc<App>,
    stream: TcpStream,
    slot: Slot,
    stop: watch::Receiver<bool>,
) {
    let conn = Arc::clone(&slot.conn);
    let Some(acceptor) = &port.tls else {
        conn.handshaken();
        serve_io(&port, TokioIo::new(stream), &conn, &settings, &app, stop).await;
        return;
    };
    let handshake = tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream));
    // Shed first: a connection shed before its task ran (a burst of them) costs no crypto.
    let tls = tokio::select! {
        biased;
        _ = conn.shed() => return,
        done = handshake => match done {
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
        },
    };
    conn.handshaken();
    let _open = OpenConnection::new(Arc::clone(&app));
    serve_io(&port, TokioIo::new(tls), &conn, &settings, &app, stop).await;
    drop(slot);
}

async fn serve_io<I>(
    port: &Port,
    io: I,
    conn: &Conn,
    settings: &Settings,
    app: &Arc<App>,
    stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = Tracked {
        inner: TowerToHyperService::new(port.router.clone()),
        activity: Arc::clone(&conn.activity),
        app: Arc::clone(app),
    };
    let served = port.builder.serve_connection(io, service).into_owned();
    serve_connection(served, conn, settings, stop).await;
}

/// Spawns one connection's task. A panic in it ends only that connection, and is counted in
/// `panics_total` so that it cannot pass unseen; the task's guards (its `--max-connections`
/// permit, its place in `connections_open`) come down as it unwinds.
fn spawn_connection(
    app: Arc<App>,
    connection: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(
        AssertUnwindSafe(connection)
            .catch_unwind()
            .map(move |ended| {
                if let Err(panic) = ended {
                    app.metrics.panicked();
                    error!(panic = panic_message(&*panic), "A connection task panicked");
                }
            }),
    )
}

/// Counts a connection in `connections_open` for as long as it lives. A guard, so the count
/// comes down however the task ends: returned, cancelled, or unwound by a panic.
struct OpenConnection(Arc<App>);

impl OpenConnection {
    fn new(app: Arc<App>) -> Self {
        app.metrics.connection_opened();
        Self(app)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.metrics.connection_closed();
    }
}

/// The router as a hyper service that keeps a connection's [`Activity`] and answers 500 for a
/// handler that panics.
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    app: Arc<App>,
}

/// The text of a panic's payload, when it is one (`panic!` with a message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// The answer to a request whose handler panicked: a `Status` as the 4xx answers are, so the
/// apiserver logs why, and then applies the webhook's `failurePolicy`.
fn handler_panicked() -> RouterResponse {
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 500,
        "reason": "InternalError", "message": "the webhook failed while answering this request",
    });
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

type RouterService = TowerToHyperService<Router>;
type RouterResponse = <RouterService as hyper::service::Service<Request<Incoming>>>::Response;
type RouterError = <RouterService as hyper::service::Service<Request<Incoming>>>::Error;

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = RouterResponse;
    type Error = RouterError;
    type Future = Pin<Box<dyn Future<Output = Result<RouterResponse, RouterError>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        // Unwind safety: what a handler shares with other requests is atomics, semaphores whose
        // permits its future returns as it is dropped, and locks that every user recovers from
        // poisoning; a panic leaves none of it half-changed.
        let fut = AssertUnwindSafe(self.inner.call(req)).catch_unwind();
        let app = Arc::clone(&self.app);
        Box::pin(async move {
            let answered = fut.await.unwrap_or_else(|panic| {
                app.metrics.panicked();
                error!(
                    panic = panic_message(&*panic),
                    "A request handler panicked; answered 500"
                );
                Ok(handler_panicked())
            });
            drop(in_flight);
            answered
        })
    }
}

/// Serves one connection until it ends, closing it gracefully (HTTP/2 GOAWAY; HTTP/1 closes
/// once the response in flight is written) when the server stops, when it has been idle for
/// `--idle-timeout` (or `--header-timeout` before its first request, as a client that sent only
/// the HTTP/2 preface), when it is `--max-connection-age` old, or when it is shed as idle; and
/// closing it outright `--shutdown-grace` (a shed one: [`SHED_GRACE`]) after that, or at once
/// when it is shed before its first request.
async fn serve_connection<C>(
    conn: C,
    slot: &Conn,
    settings: &Settings,
    mut stop: watch::Receiver<bool>,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let activity = &slot.activity;
    let mut conn = std::pin::pin!(conn);
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hard_close: Option<Instant> = None;
    let mut shed = false;
    loop {
        let close_at = hard_close.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            how = slot.shed(), if !shed => {
                shed = true;
                if how == Close::Now {
                    debug!("Shed a connection that had sent no request");
                    return;
                }
                debug!("Shed an idle connection, gracefully");
                conn.as_mut().graceful_shutdown();
                let by = Instant::now() + SHED_GRACE;
                hard_close = Some(hard_close.map_or(by, |at| at.min(by)));
            }
            () = stopped(&mut stop), if hard_close.is_none() => {
                conn.as_mut().graceful_shutdown();
                hard_close = Some(Instant::now() + settings.shutdown_grace);
            }
            _ = check.tick(), if hard_close.is_none() => {
                let now = Instant::now();
                let idle_limit = if activity.has_started() {
                    settings.idle_timeout
                } else {
                    settings.header_timeout
                };
                let idle = activity.idle_for(now).is_some_and(|idle| idle >= idle_limit);
                let old = now.saturating_duration_since(activity.born) >= settings.max_connection_age;
                if idle || old {
                    debug!(idle, old, "Closing the connection gracefully");
                    conn.as_mut().graceful_shutdown();
                    hard_close = Some(now + settings.shutdown_grace);
                }
            }
            () = tokio::time::sleep_until(close_at), if hard_close.is_some() => {
                debug!("Closed a connection still busy after the grace period");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        core::policy::Policy,
        pki,
        serve::{Limits, polled::Polled, tls::ServingCert},
    };

    fn app() -> Arc<App> {
        let g = pki::generate(&["localhost".into()], 1).unwrap();
        let cert =
            ServingCert::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes(), "c", "k").unwrap();
        Arc::new(App::new(
            Polled::fixed(Policy::builtin().unwrap()),
            Arc::new(Polled::fixed(cert)),
            None,
            Limits::default(),
        ))
    }

    #[tokio::test]
    async fn a_connection_task_that_panics_is_counted_and_its_open_count_comes_down() {
        let app = app();
        let task = spawn_connection(Arc::clone(&app), {
            let app = Arc::clone(&app);
            async move {
                let _open = OpenConnection::new(app);
                panic!("a connection task panicked");
            }
        });
        task.await.unwrap();
        assert_eq!(app.metrics.connections_open(), 0);
        assert_eq!(app.metrics.panics(), 1);
    }

    #[test]
    fn a_connection_is_idle_only_with_nothing_in_flight() {
        let activity = Arc::new(Activity::default());
        let later = activity.born + Duration::from_secs(5);
        assert_eq!(activity.idle_for(later), Some(Duration::from_secs(5)));
        let request = activity.begin();
        assert_eq!(activity.idle_for(later), None);
        drop(request);
        assert!(
            activity
                .idle_for(Instant::now() + Duration::from_secs(1))
                .unwrap()
                >= Duration::from_millis(900)
        );
    }
}
