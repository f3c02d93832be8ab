//! rustls for the admission port: the serving certificate and the client CA as [`Polled`]
//! values, and the server configuration that reads them on every handshake.
//!
//! No I/O of its own; the files are read by [`Polled`]. rustls asks the resolver for a certificate
//! and the verifier for a client check on every handshake, so a reload is seen by the next new
//! connection while connections already open keep what they shook hands with.

use std::{fmt, sync::Arc};

use rustls::{
    DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use super::polled::{File, Parse, Polled};
use crate::pki;

/// Why a certificate, key or CA bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: no PEM CERTIFICATE block")]
    NoCertificate(String),
    #[error("{path}: not a PEM certificate: {message}")]
    BadCertificate { path: String, message: String },
    #[error("{path}: no usable PEM private key: {message}")]
    BadKey { path: String, message: String },
    #[error("{cert} and {key} do not belong together: {message}")]
    Mismatch {
        cert: String,
        key: String,
        message: String,
    },
    #[error("{0}: no CA certificate usable for client verification")]
    ClientCa(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider: ring, which builds fastest here and needs no C toolchain beyond cc.
#[must_use]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A serving certificate chain and its key, checked to belong together.
pub struct ServingCert {
    key: Arc<CertifiedKey>,
    /// The leaf certificate's `notAfter`, in Unix seconds (0 when it cannot be read).
    pub not_after: i64,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Parses a PEM chain (leaf first) and a PEM private key. `cert_name` and `key_name` name
    /// them in errors.
    ///
    /// # Errors
    /// When either does not parse, the key type is unsupported, or the key is not the leaf's.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_name: &str,
        key_name: &str,
    ) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::BadCertificate {
                path: cert_name.to_owned(),
                message: e.to_string(),
            })?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::NoCertificate(cert_name.to_owned()));
        };
        let not_after = pki::not_after(leaf).unwrap_or(0);
        let bad_key = |message: String| TlsError::BadKey {
            path: key_name.to_owned(),
            message,
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad_key(e.to_string()))?;
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| bad_key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|e| TlsError::Mismatch {
            cert: cert_name.to_owned(),
            key: key_name.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self {
            key: Arc::new(certified),
            not_after,
        })
    }
}

/// Two files: the chain, then the key.
impl Parse for ServingCert {
    type Error = TlsError;

    fn parse(files: &[File<'_>]) -> Result<Self, TlsError> {
        match files {
            [cert, key] => Self::from_pem(cert.bytes, key.bytes, cert.name, key.name),
            _ => Err(TlsError::Config(
                "a certificate and a key are needed".into(),
            )),
        }
    }
}

/// A client CA bundle, as a verifier that requires a certificate it signed.
#[derive(Debug)]
pub struct ClientCa(Arc<dyn ClientCertVerifier>);

impl ClientCa {
    /// Reads a PEM bundle of one or more CA certificates.
    ///
    /// # Errors
    /// When the bundle holds no usable CA certificate.
    pub fn from_pem(pem: &[u8], name: &str) -> Result<Self, TlsError> {
        let refused = || TlsError::ClientCa(name.to_owned());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots
                .add(cert.map_err(|_| refused())?)
                .map_err(|_| refused())?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|_| refused())?;
        Ok(Self(verifier))
    }
}

impl Parse for ClientCa {
    type Error = TlsError;

    fn parse(files: &[File<'_>]) -> Result<Self, TlsError> {
        match files {
            [bundle] => Self::from_pem(bundle.bytes, bundle.name),
            _ => Err(TlsError::Config("one CA bundle is needed".into())),
        }
    }
}

/// Hands rustls the serving certificate in force.
#[derive(Debug)]
struct Resolver(Arc<Polled<ServingCert>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().key))
    }
}

/// Verifies client certificates against the client CA in force.
#[derive(Debug)]
struct Verifier(Arc<Polled<ClientCa>>);

impl ClientCertVerifier for Verifier {
    // The CA names a client may pick its certificate by. They would borrow from a value that a
    // reload can replace, so none are sent; the apiserver presents the one certificate it has.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.0
            .current()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0
            .current()
            .0
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0
            .current()
            .0
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().0.supported_verify_schemes()
    }
}

/// The server configuration: TLS 1.2 and 1.3 only, ALPN `h2` then `http/1.1`, the certificate in
/// force, and client certificates verified against the client CA in force when one is given.
///
/// # Errors
/// When rustls refuses the protocol versions (it does not with the ring provider).
pub fn server_config(
    cert: Arc<Polled<ServingCert>>,
    client_ca: Option<Arc<Polled<ClientCa>>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(Arc::new(Verifier(ca))),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Resolver(cert)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_garbage_and_mismatched_pairs() {
        let a = pki::generate(&["a".into()], 1).unwrap();
        let b = pki::generate(&["b".into()], 1).unwrap();
        let pem = |g: &pki::Generated| (g.cert_pem.clone(), g.key_pem.clone());
        let ((ac, ak), (_, bk)) = (pem(&a), pem(&b));
        assert!(ServingCert::from_pem(ac.as_bytes(), ak.as_bytes(), "c", "k").is_ok());
        let e = ServingCert::from_pem(b"garbage", ak.as_bytes(), "c", "k").unwrap_err();
        assert_eq!(e.to_string(), "c: no PEM CERTIFICATE block");
        let e = ServingCert::from_pem(ac.as_bytes(), b"garbage", "c", "k").unwrap_err();
        assert!(
            e.to_string().starts_with("k: no usable PEM private key"),
            "{e}"
        );
        let e = ServingCert::from_pem(ac.as_bytes(), bk.as_bytes(), "c", "k").unwrap_err();
        assert!(
            e.to_string().starts_with("c and k do not belong together"),
            "{e}"
        );
    }

    #[test]
    fn client_ca_needs_a_certificate() {
        let e = ClientCa::from_pem(b"", "ca.crt").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ca.crt: no CA certificate usable for client verification"
        );
    }
}
