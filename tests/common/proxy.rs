//! What kube-proxy does for a Service, on loopback: connections to one address are forwarded to
//! the backends in turn, skipping any that refuse. The test control plane has no kube-proxy, so a
//! registration that should reach "the Service" points its URL here, and a killed replica drops
//! out as its endpoint would. Runs on its own thread and runtime, so a test that blocks (kubectl,
//! sleeps) does not stall it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

/// A loopback address of this test binary's own (127.3.x.y from the process id and a count), for
/// a forwarder on a fixed port such as 443: two test runs on one machine do not collide.
pub fn own_loopback() -> std::net::Ipv4Addr {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let id = std::process::id()
        .wrapping_mul(7)
        .wrapping_add(u32::try_from(n).unwrap());
    let [_, _, x, y] = id.to_be_bytes();
    std::net::Ipv4Addr::new(127, 3, x, y.max(1))
}

pub struct ServiceProxy {
    pub addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    /// Bumped to end every connection open now.
    cut: watch::Sender<u64>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl ServiceProxy {
    pub fn start(backends: Vec<SocketAddr>) -> Self {
        Self::start_on(([127, 0, 0, 1], 0).into(), backends)
    }

    /// As [`ServiceProxy::start`], listening on `bind`.
    pub fn start_on(bind: SocketAddr, backends: Vec<SocketAddr>) -> Self {
        let listener = std::net::TcpListener::bind(bind)
            .unwrap_or_else(|e| panic!("cannot listen on {bind} (port 443 needs root): {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(Mutex::new(backends));
        let (stop, stopped) = oneshot::channel();
        let (cut, cuts) = watch::channel(0);
        let shared = Arc::clone(&backends);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let next = Arc::new(AtomicUsize::new(0));
                let accept = async {
                    loop {
                        let Ok((inbound, _)) = listener.accept().await else {
                            // Out of descriptors, say: wait rather than spin.
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        };
                        let backends = shared.lock().unwrap().clone();
                        let next = Arc::clone(&next);
                        let mut cuts = cuts.clone();
                        cuts.mark_unchanged();
                        tokio::spawn(forward(inbound, backends, next, cuts));
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            backends,
            cut,
            stop: Some(stop),
        }
    }

    /// A network partition: no backend is reachable any more, and every open connection goes
    /// silent (it stays open; nothing more passes either way).
    pub fn cut(&self) {
        self.set_backends(Vec::new());
        self.cut.send_modify(|n| *n += 1);
    }

    /// Replaces the endpoints, as the endpointslice controller would.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap() = backends;
    }
}

/// How long a cut connection is held open, silent, at most.
const HOLD: std::time::Duration = std::time::Duration::from_secs(120);

/// Connects to the backends in turn from the next one, and copies both ways until either side
/// closes. With no backend, or once cut, the connection stays open and silent, as behind a
/// network partition: the client learns of it only from its own timeouts.
async fn forward(
    mut inbound: TcpStream,
    backends: Vec<SocketAddr>,
    next: Arc<AtomicUsize>,
    mut cuts: watch::Receiver<u64>,
) {
    let start = next.fetch_add(1, Ordering::Relaxed);
    for i in 0..backends.len() {
        let backend = backends[(start + i) % backends.len()];
        if let Ok(mut outbound) = TcpStream::connect(backend).await {
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                _ = cuts.changed() => break,
            }
        }
    }
    let _ = tokio::time::timeout(HOLD, std::future::pending::<()>()).await;
    drop(inbound);
}
