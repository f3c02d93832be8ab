//! Certificate issuing for the `certs` command, development mode and tests: a CA, serving and
//! client certificates it signs. [`not_after`] reads a certificate's expiry back.
//!
//! Reads the clock (validity starts yesterday, to absorb clock skew) and the random number
//! generator (keys); writes nothing.

mod der;

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

pub use der::not_after;

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate a certificate")]
pub struct PkiError(#[from] rcgen::Error);

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
    pub fn new(name: &str, days: u32) -> Result<Self, PkiError> {
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

    /// A client certificate named `common_name`.
    ///
    /// # Errors
    /// When the key cannot be generated.
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
pub fn generate(sans: &[String], days: u32) -> Result<Generated, PkiError> {
    Ca::new("outpost-webhook CA", days)?.serving(sans, days)
}

/// A client certificate signed by a new CA, for tests of `--client-ca` and for apiservers that
/// present one.
///
/// # Errors
/// When the key cannot be generated.
pub fn generate_client(common_name: &str, days: u32) -> Result<Generated, PkiError> {
    Ca::new("outpost-webhook client CA", days)?.client(common_name, days)
}

/// Valid from midnight UTC yesterday (to absorb clock skew) until midnight UTC `days` from today.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let today = OffsetDateTime::now_utc().date().midnight().assume_utc();
    params.not_before = today - Duration::days(1);
    params.not_after = today + Duration::days(i64::from(days));
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
}
