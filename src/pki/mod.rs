//! Certificate issuing for the `certs` command, development mode and tests: a CA (new, or read
//! back from its PEM certificate and key), serving and client certificates it signs. [`x509`]
//! reads certificates: expiry, CA bundles.
//!
//! Reads the clock (validity starts yesterday, to absorb clock skew) and the random number
//! generator (keys); writes nothing.

pub mod x509;

use std::net::IpAddr;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use time::{Date, Duration, OffsetDateTime};

pub use x509::not_after;

/// Why a certificate could not be issued, or a CA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate a certificate")]
    Generate(#[from] rcgen::Error),
    #[error(
        "a validity of {days} day(s) is out of range: it must be at least 1 and end before 9999"
    )]
    Validity { days: u32 },
    #[error(
        "the certificate would expire on {leaf}, after its CA, which expires on {ca}: issue it \
         for fewer days, or make a new CA"
    )]
    OutlivesCa { leaf: Date, ca: Date },
    #[error("the CA certificate has no PEM CERTIFICATE block that parses as X.509")]
    CaCertificate,
    #[error("the CA certificate is not a CA (no basicConstraints CA:true)")]
    NotCa,
    #[error("the CA key is not a PEM private key rcgen can sign with")]
    CaKey(#[source] rcgen::Error),
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
}

/// When a certificate is valid: from `not_before` to `not_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
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
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    not_after: OffsetDateTime,
}

impl Ca {
    /// A new CA named `name`, valid for `days`.
    ///
    /// # Errors
    /// When `days` is out of range or the key cannot be generated.
    pub fn new(name: &str, days: u32) -> Result<Self, PkiError> {
        let mut ca = ca_params(name)?;
        set_validity(&mut ca, days)?;
        Self::self_signed(ca)
    }

    /// A new CA named `name`, valid exactly for `validity` (self-managed TLS renews by the
    /// second, not by the day).
    ///
    /// # Errors
    /// When the key cannot be generated.
    pub fn new_valid(name: &str, validity: Validity) -> Result<Self, PkiError> {
        let mut ca = ca_params(name)?;
        ca.not_before = validity.not_before;
        ca.not_after = validity.not_after;
        Self::self_signed(ca)
    }

    fn self_signed(ca: CertificateParams) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let pem = pem_certificate(ca.self_signed(&key)?.der());
        Ok(Self {
            not_after: ca.not_after,
            issuer: Issuer::new(ca, key),
            pem,
        })
    }

    /// An existing CA, from its PEM certificate (the first CERTIFICATE block) and PEM key.
    ///
    /// # Errors
    /// When the certificate does not parse or is not a CA, or the key does not parse or is not
    /// the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let der = x509::first_certificate(cert_pem.as_bytes()).ok_or(PkiError::CaCertificate)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|_| PkiError::CaCertificate)?;
        if !x509::is_ca(&cert) {
            return Err(PkiError::NotCa);
        }
        let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
            .map_err(|_| PkiError::CaCertificate)?;
        let key = KeyPair::from_pem(key_pem).map_err(PkiError::CaKey)?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(der.as_slice()), key)?;
        Ok(Self {
            issuer,
            pem: pem_certificate(&der),
            not_after,
        })
    }

    /// The CA certificate, PEM.
    #[must_use]
    pub fn pem(&self) -> String {
        self.pem.clone()
    }

    /// The CA's private key, PEM (PKCS#8).
    #[must_use]
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// When the CA expires.
    #[must_use]
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// A serving certificate for `sans` (DNS names or IP addresses).
    ///
    /// # Errors
    /// When a SAN is not a valid DNS name, `days` is out of range or past the CA's expiry, or
    /// the key cannot be generated.
    pub fn serving(&self, sans: &[String], days: u32) -> Result<Generated, PkiError> {
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

    /// A serving certificate for `sans`, valid exactly for `validity`.
    ///
    /// # Errors
    /// When a SAN is not a valid DNS name, the validity ends after the CA's, or the key cannot
    /// be generated.
    pub fn serving_valid(
        &self,
        sans: &[String],
        validity: Validity,
    ) -> Result<Generated, PkiError> {
        let mut leaf = CertificateParams::new(Vec::<String>::new())?;
        for san in sans {
            leaf.subject_alt_names.push(match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.clone().try_into()?),
            });
        }
        leaf.not_before = validity.not_before;
        leaf.not_after = validity.not_after;
        let name = sans.first().map_or("outpost-webhook", String::as_str);
        self.signed(leaf, name, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate named `common_name`.
    ///
    /// # Errors
    /// When `days` is out of range or past the CA's expiry, or the key cannot be generated.
    pub fn client(&self, common_name: &str, days: u32) -> Result<Generated, PkiError> {
        let leaf = CertificateParams::new(Vec::<String>::new())?;
        self.sign(leaf, common_name, ExtendedKeyUsagePurpose::ClientAuth, days)
    }

    fn sign(
        &self,
        mut leaf: CertificateParams,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        days: u32,
    ) -> Result<Generated, PkiError> {
        set_validity(&mut leaf, days)?;
        self.signed(leaf, common_name, usage)
    }

    fn signed(
        &self,
        mut leaf: CertificateParams,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Generated, PkiError> {
        leaf.distinguished_name
            .push(DnType::CommonName, common_name);
        leaf.extended_key_usages = vec![usage];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // A chain is only as valid as its shortest link: a leaf past its CA would be refused
        // from the day the CA expires, with nothing in the leaf to say why.
        if leaf.not_after > self.not_after {
            return Err(PkiError::OutlivesCa {
                leaf: leaf.not_after.date(),
                ca: self.not_after.date(),
            });
        }
        let key = KeyPair::generate()?;
        let cert = leaf.signed_by(&key, &self.issuer)?;
        Ok(Generated {
            ca_pem: self.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A CA certificate's parameters, validity aside: it signs leaves only (path length 0).
fn ca_params(name: &str) -> Result<CertificateParams, PkiError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// Generates a CA and a serving certificate for `sans` (DNS names or IP addresses), both valid
/// from yesterday (to absorb clock skew) for `days`.
///
/// # Errors
/// When a SAN is not a valid DNS name, `days` is out of range, or the key cannot be generated.
pub fn generate(sans: &[String], days: u32) -> Result<Generated, PkiError> {
    Ca::new("outpost-webhook CA", days)?.serving(sans, days)
}

/// A client certificate signed by a new CA, for tests of `--client-ca` and for apiservers that
/// present one.
///
/// # Errors
/// When `days` is out of range or the key cannot be generated.
pub fn generate_client(common_name: &str, days: u32) -> Result<Generated, PkiError> {
    Ca::new("outpost-webhook client CA", days)?.client(common_name, days)
}

/// A DER certificate as PEM, 64 base64 characters a line.
#[must_use]
pub fn pem_certificate(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Valid from midnight UTC yesterday (to absorb clock skew) until midnight UTC `days` from today.
/// Zero days would be a certificate already expired; a date past 9999 cannot be written.
fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), PkiError> {
    let today = OffsetDateTime::now_utc().date().midnight().assume_utc();
    let not_after = (days > 0)
        .then(|| today.checked_add(Duration::days(i64::from(days))))
        .flatten()
        .filter(|t| t.year() <= 9998)
        .ok_or(PkiError::Validity { days })?;
    params.not_before = today - Duration::days(1);
    params.not_after = not_after;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, pem::PemObject};

    #[test]
    fn serving_certificate_expires_at_midnight_utc_days_from_today() {
        let g = generate(&["a.b.svc".into(), "127.0.0.1".into()], 30).unwrap();
        let der = CertificateDer::from_pem_slice(g.cert_pem.as_bytes()).unwrap();
        let expiry = not_after(&der).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(
            expiry > now + 29 * 86_400 && expiry <= now + 31 * 86_400,
            "{expiry} vs {now}"
        );
        assert_eq!(expiry % 86_400, 0);
    }

    #[test]
    fn zero_and_huge_validities_are_errors_not_panics() {
        for days in [0, 3_000_000, u32::MAX] {
            assert!(
                matches!(
                    generate(&["a".into()], days),
                    Err(PkiError::Validity { .. })
                ),
                "{days}"
            );
        }
    }

    #[test]
    fn a_leaf_may_not_outlive_its_ca() {
        let ca = Ca::new("ca", 10).unwrap();
        assert!(ca.serving(&["a".into()], 10).is_ok());
        let e = ca.serving(&["a".into()], 11).err().unwrap();
        assert!(matches!(e, PkiError::OutlivesCa { .. }), "{e}");
    }

    #[test]
    fn a_ca_read_back_from_pem_issues_leaves_it_verifies() {
        let ca = Ca::new("ca", 100).unwrap();
        let again = Ca::from_pem(&ca.pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.pem(), ca.pem());
        assert_eq!(again.not_after(), ca.not_after());
        let leaf = again.serving(&["a.b.svc".into()], 30).unwrap();
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn a_ca_is_refused_with_another_key_or_when_it_is_a_leaf() {
        let (ca, other) = (Ca::new("ca", 10).unwrap(), Ca::new("other", 10).unwrap());
        assert!(matches!(
            Ca::from_pem(&ca.pem(), &other.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
        let leaf = ca.serving(&["a".into()], 5).unwrap();
        assert!(matches!(
            Ca::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(PkiError::NotCa)
        ));
        assert!(matches!(
            Ca::from_pem("", &ca.key_pem()),
            Err(PkiError::CaCertificate)
        ));
    }
}
