//! A client that behaves as the kube-apiserver's webhook client does: TLS verified against the
//! CA bundle as `<service>.<namespace>.svc`, HTTP/1.1 keep-alive, `POST /mutate?timeout=10s`.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use outpost_webhook::{core::laws, serve::tls};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

/// The name the apiserver dials for a Service webhook: `<service>.<namespace>.svc`.
pub const SERVER_NAME: &str = "outpost-webhook.outpost-webhook.svc";

/// A TLS client configuration trusting `ca_pem`, offering the given ALPN protocols.
pub fn client_config(
    ca_pem: &str,
    alpn: &[&[u8]],
    identity: Option<(&str, &str)>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // The apiserver's Go client keeps no TLS session cache, so every new connection verifies the
    // certificate served now. A resumed session would skip that and hide a certificate change.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Opens a TLS connection, verifying the server as `SERVER_NAME`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(config)
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
}

/// Opens a TLS connection, verifying the server as `name`.
pub async fn tls_connect_as(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
}

/// A TCP connection from the loopback address `local` (another client than 127.0.0.1, to the
/// server's per-peer limits).
pub async fn tcp_connect_from(
    local: std::net::IpAddr,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    assert!(local.is_loopback() && addr.ip().is_loopback());
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local, 0))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// As [`tls_connect`], from the loopback address `local`.
pub async fn tls_connect_from(
    local: std::net::IpAddr,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = tcp_connect_from(local, addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
}

/// An HTTP/1.1 keep-alive connection, as the apiserver pools towards Service webhooks.
pub struct Http1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Http1 {
    pub async fn connect(addr: SocketAddr, ca_pem: &str) -> Self {
        Self::connect_with(addr, client_config(ca_pem, &[b"http/1.1"], None)).await
    }

    pub async fn connect_with(addr: SocketAddr, config: Arc<ClientConfig>) -> Self {
        let tls = tls_connect(addr, config).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender, task }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        self.sender.ready().await?;
        self.sender.send_request(req).await
    }

    /// `POST /mutate?timeout=10s` with an AdmissionReview, as the apiserver sends it.
    pub async fn review(&mut self, review: &Value) -> (u16, Value) {
        let resp = self.send(review_request(review)).await.unwrap();
        read_json(resp).await
    }
}

pub fn review_request(review: &Value) -> Request<Full<Bytes>> {
    Request::post("/mutate?timeout=10s")
        .header("host", SERVER_NAME)
        .header("content-type", "application/json")
        .header("accept", "application/json, */*")
        .body(Full::new(Bytes::from(serde_json::to_vec(review).unwrap())))
        .unwrap()
}

pub async fn read_json(resp: Response<Incoming>) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// What the apiserver does with an answer: the contract checked, the patch decoded and applied.
pub fn apply_answer(review: &Value, answer: &Value) -> Value {
    let bytes = serde_json::to_vec(answer).unwrap();
    laws::apply_response(review, &bytes)
        .unwrap_or_else(|e| panic!("{e}"))
        .patched
}

/// A plain HTTP/1.1 GET on the health port.
pub async fn health_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get(path)
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A request body whose chunks the test sends when it chooses: a slow or paused client.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}
