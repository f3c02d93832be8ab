//! TLS: PEM files to a rustls server configuration, the certificate reloader, and certificate
//! generation for the `certs` command and development mode.
//!
//! Reads certificate files ([`CertStore::from_files`], [`CertStore::reload_if_changed`]); the rest
//! is pure. The reloader polls and compares bytes instead of watching inotify events: a Kubernetes
//! Secret volume is updated by swapping its `..data` symlink, which inotify watches on the files
//! themselves do not see.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

/// Why a certificate or key was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
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
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A parsed certificate chain and key, with the leaf's `notAfter`.
pub struct Loaded {
    key: Arc<CertifiedKey>,
    /// The leaf certificate's `notAfter`, in Unix seconds (0 when it cannot be read).
    pub not_after: i64,
}

/// Parses a PEM chain (leaf first) and a PEM private key into a rustls signing identity,
/// checking that they belong together. `cert_name` and `key_name` name them in errors.
///
/// # Errors
/// When either does not parse, the key type is unsupported, or the key is not the leaf's.
pub fn parse_pem(
    provider: &CryptoProvider,
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<Loaded, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_name.to_owned(),
            message: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate(cert_name.to_owned()));
    };
    let not_after = not_after(leaf).unwrap_or(0);
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::BadKey {
        path: key_name.to_owned(),
        message: e.to_string(),
    })?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey {
            path: key_name.to_owned(),
            message: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert_name.to_owned(),
        key: key_name.to_owned(),
        message: e.to_string(),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
    })
}

/// The serving certificate, swappable while connections are served.
///
/// rustls asks the resolver for a certificate on every handshake, so a reload is seen by the
/// next new connection; connections already open keep the certificate they shook hands with.
pub struct CertStore {
    provider: Arc<CryptoProvider>,
    files: Option<(PathBuf, PathBuf)>,
    current: RwLock<Arc<CertifiedKey>>,
    not_after: RwLock<i64>,
    /// The bytes last read, good or bad, so one bad file is refused (and counted) once.
    last_seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads the certificate and key files; they are re-read by [`Self::reload_if_changed`].
    ///
    /// # Errors
    /// When either file cannot be read or parsed, or they do not belong together.
    pub fn from_files(
        provider: Arc<CryptoProvider>,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, TlsError> {
        let (cert_pem, key_pem) = read_pair(cert, key)?;
        let loaded = parse_pem(&provider, &cert_pem, &key_pem, &name(cert), &name(key))?;
        Ok(Self {
            provider,
            files: Some((cert.to_owned(), key.to_owned())),
            current: RwLock::new(loaded.key),
            not_after: RwLock::new(loaded.not_after),
            last_seen: Mutex::new((cert_pem, key_pem)),
        })
    }

    /// A fixed certificate (development mode and tests): never reloaded.
    ///
    /// # Errors
    /// As [`parse_pem`].
    pub fn from_pem(
        provider: Arc<CryptoProvider>,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        let loaded = parse_pem(&provider, cert_pem, key_pem, "certificate", "key")?;
        Ok(Self {
            provider,
            files: None,
            current: RwLock::new(loaded.key),
            not_after: RwLock::new(loaded.not_after),
            last_seen: Mutex::new((cert_pem.to_vec(), key_pem.to_vec())),
        })
    }

    /// Re-reads the files and swaps the certificate when their content changed.
    ///
    /// Returns `Ok(true)` when a new certificate is now served, `Ok(false)` when nothing changed.
    /// On error the old certificate keeps serving; the same bad content is not reported twice.
    ///
    /// # Errors
    /// When changed files cannot be read or parsed, or the new pair does not belong together.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let Some((cert, key)) = &self.files else {
            return Ok(false);
        };
        let (cert_pem, key_pem) = read_pair(cert, key)?;
        {
            let mut last = self
                .last_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.0 == cert_pem && last.1 == key_pem {
                return Ok(false);
            }
            *last = (cert_pem.clone(), key_pem.clone());
        }
        let loaded = parse_pem(&self.provider, &cert_pem, &key_pem, &name(cert), &name(key))?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loaded.key;
        *self
            .not_after
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loaded.not_after;
        Ok(true)
    }

    /// The serving certificate's `notAfter`, in Unix seconds.
    #[must_use]
    pub fn not_after(&self) -> i64 {
        *self
            .not_after
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True when the certificate comes from files that are polled.
    #[must_use]
    pub fn reloadable(&self) -> bool {
        self.files.is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: name(p),
            source,
        })
    };
    Ok((read(cert)?, read(key)?))
}

fn name(p: &Path) -> String {
    p.display().to_string()
}

/// The crypto provider: ring, which builds fastest here and needs no C toolchain beyond cc.
#[must_use]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration: TLS 1.2 and 1.3 only, ALPN `h2` then `http/1.1`, the certificate
/// from `store`, and client certificates verified against `client_ca` when given.
///
/// # Errors
/// When the client CA bundle has no usable certificate.
pub fn server_config(
    store: Arc<CertStore>,
    client_ca: Option<(&[u8], &str)>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::clone(&store.provider);
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some((pem, path)) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|_| TlsError::ClientCa(path.to_owned()))?;
                roots
                    .add(cert)
                    .map_err(|_| TlsError::ClientCa(path.to_owned()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|_| TlsError::ClientCa(path.to_owned()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A CA and a serving certificate it signed, PEM-encoded.
pub struct Generated {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The DNS names the apiserver may dial for Service `name` in namespace `namespace`.
#[must_use]
pub fn service_dns_names(name: &str, namespace: &str) -> Vec<String> {
    vec![
        name.to_owned(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
    ]
}

/// A certificate authority that can issue more than one certificate (rotation tests, and the
/// CA kept by `certs`).
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA named `name`, valid for `days`.
    ///
    /// # Errors
    /// When the key cannot be generated.
    pub fn new(name: &str, days: u32) -> Result<Self, TlsError> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut ca, days);
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?,
        })
    }

    /// The CA certificate, PEM.
    #[must_use]
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A serving certificate for `sans` (DNS names or IP addresses).
    ///
    /// # Errors
    /// When a SAN is not a valid DNS name or the key cannot be generated.
    pub fn serving(&self, sans: &[String], days: u32) -> Result<Generated, TlsError> {
        let mut leaf = CertificateParams::new(Vec::<String>::new())?;
        for san in sans {
            leaf.subject_alt_names.push(match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.clone().try_into()?),
            });
        }
        let name = sans.first().map_or("outpost-webhook", String::as_str);
        self.sign(leaf, name, ExtendedKeyUsagePurpose::ServerAuth, days)
    }

    /// A client certificate named `common_name`.
    ///
    /// # Errors
    /// When the key cannot be generated.
    pub fn client(&self, common_name: &str, days: u32) -> Result<Generated, TlsError> {
        let leaf = CertificateParams::new(Vec::<String>::new())?;
        self.sign(leaf, common_name, ExtendedKeyUsagePurpose::ClientAuth, days)
    }

    fn sign(
        &self,
        mut leaf: CertificateParams,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        days: u32,
    ) -> Result<Generated, TlsError> {
        leaf.distinguished_name
            .push(DnType::CommonName, common_name);
        leaf.extended_key_usages = vec![usage];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut leaf, days);
        let key = KeyPair::generate()?;
        let cert = leaf.signed_by(&key, &self.issuer)?;
        Ok(Generated {
            ca_pem: self.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Generates a CA and a serving certificate for `sans` (DNS names or IP addresses), valid from
/// yesterday (to absorb clock skew) for `days`.
///
/// # Errors
/// When a SAN is not a valid DNS name or the key cannot be generated.
pub fn generate(sans: &[String], days: u32) -> Result<Generated, TlsError> {
    Ca::new("outpost-webhook CA", days)?.serving(sans, days)
}

/// A client certificate signed by a new CA, for tests of `--client-ca` and for apiservers that
/// present one.
///
/// # Errors
/// When the key cannot be generated.
pub fn generate_client(common_name: &str, days: u32) -> Result<Generated, TlsError> {
    Ca::new("outpost-webhook client CA", days)?.client(common_name, days)
}

/// Valid from yesterday (to absorb clock skew) until `days` from today, at midnight UTC.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let today = i64::try_from(now / 86_400).unwrap_or(0);
    let day = |d: i64| {
        let (y, m, dd) = civil_from_days(d);
        rcgen::date_time_ymd(y, m, dd)
    };
    params.not_before = day(today - 1);
    params.not_after = day(today + i64::from(days));
}

/// Days since 1970-01-01 to a (year, month, day) date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        i32::try_from(y).unwrap_or(1970),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    )
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The `notAfter` of a DER certificate, in Unix seconds.
///
/// A few lines of DER walking instead of an X.509 crate: Certificate → tbsCertificate →
/// (optional version), serialNumber, signature, issuer, validity → notAfter.
#[must_use]
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xA0 {
        tbs = rest;
    }
    for _ in 0..3 {
        let (_, _, rest) = tlv(tbs)?; // serialNumber, signature, issuer
        tbs = rest;
    }
    let (_, validity, _) = tlv(tbs)?;
    let (_, _, rest) = tlv(validity)?; // notBefore
    let (tag, time, _) = tlv(rest)?;
    let text = std::str::from_utf8(time).ok()?;
    let digits = |s: &str| s.parse::<i64>().ok();
    let (year, rest) = match tag {
        0x17 => {
            let yy = digits(text.get(..2)?)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
        }
        0x18 => (digits(text.get(..4)?)?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2).and_then(digits);
    let days = days_from_civil(year, field(0)?, field(2)?);
    Some(days * 86_400 + field(4)? * 3600 + field(6)? * 60 + field(8)?)
}

/// One DER tag-length-value: (tag, content, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for byte in b.get(2..2 + n)? {
            len = (len << 8) | usize::from(*byte);
        }
        (len, 2 + n)
    };
    let content = b.get(header..header.checked_add(len)?)?;
    Some((tag, content, b.get(header + len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        for d in [-1, 0, 59, 365, 11_016, 20_000, 47_482] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(
                days_from_civil(i64::from(y), i64::from(m), i64::from(dd)),
                d
            );
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }

    #[test]
    fn reads_not_after_of_a_generated_certificate() {
        let g = generate(&["a.b.svc".into(), "127.0.0.1".into()], 30).unwrap();
        let der = CertificateDer::from_pem_slice(g.cert_pem.as_bytes()).unwrap();
        let expiry = not_after(&der).unwrap();
        let now = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap();
        // Valid until midnight UTC 30 days after today.
        assert!(
            expiry > now + 29 * 86_400 && expiry <= now + 31 * 86_400,
            "{expiry} vs {now}"
        );
        assert_eq!(expiry % 86_400, 0);
    }

    #[test]
    fn parse_refuses_garbage_and_mismatched_pairs() {
        let p = provider();
        let a = generate(&["a".into()], 1).unwrap();
        let b = generate(&["b".into()], 1).unwrap();
        assert!(parse_pem(&p, a.cert_pem.as_bytes(), a.key_pem.as_bytes(), "c", "k").is_ok());
        let e = parse_pem(&p, b"garbage", a.key_pem.as_bytes(), "c", "k")
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "c: no PEM CERTIFICATE block");
        let e = parse_pem(&p, a.cert_pem.as_bytes(), b"garbage", "c", "k")
            .err()
            .unwrap();
        assert!(
            e.to_string().starts_with("k: no usable PEM private key"),
            "{e}"
        );
        let e = parse_pem(&p, a.cert_pem.as_bytes(), b.key_pem.as_bytes(), "c", "k")
            .err()
            .unwrap();
        assert!(
            e.to_string().starts_with("c and k do not belong together"),
            "{e}"
        );
    }

    #[test]
    fn tlv_refuses_truncated_input() {
        assert!(tlv(&[0x30]).is_none());
        assert!(tlv(&[0x30, 0x05, 1, 2]).is_none());
        assert!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x00]).is_none());
    }
}
