//! The sockets: admission on TLS and health on plain HTTP, connection limits and timeouts, the
//! reload timer, and the graceful drain on shutdown.
//!
//! Does network I/O.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
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

use super::{
    ServeError, Settings,
    app::App,
    http::{health_router, router},
};

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
