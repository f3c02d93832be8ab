//! Reads X.509 certificates with x509-parser: a certificate's `notAfter`, whether it is a CA,
//! and a PEM CA bundle. Pure: no I/O.
//!
//! x509-parser comes with rcgen's `x509-parser` feature, which `certs --ca-cert` needs to sign
//! with an existing CA; reading here with the same crate replaces a hand-written DER walker.

use x509_parser::{certificate::X509Certificate, parse_x509_certificate, pem::Pem};

/// The `notAfter` of a DER certificate, in Unix seconds; `None` when it does not parse.
#[must_use]
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The `notBefore` of a DER certificate, in Unix seconds; `None` when it does not parse.
#[must_use]
pub fn not_before(der: &[u8]) -> Option<i64> {
    let (_, cert) = parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_before.timestamp())
}

/// The DER of the first PEM `CERTIFICATE` block in `pem`.
#[must_use]
pub fn first_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|b| b.label == "CERTIFICATE")
        .map(|b| b.contents)
}

/// Why a CA bundle was refused. Each message says what was found instead of a CA certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("has no PEM CERTIFICATE block")]
    Empty,
    #[error("block {index} is a PEM {label:?} block, not a CERTIFICATE")]
    NotCertificate { index: usize, label: String },
    #[error("block {index} is not valid PEM")]
    Pem { index: usize },
    #[error("block {index} is not an X.509 certificate")]
    NotX509 { index: usize },
    #[error(
        "block {index} ({subject}) is not a CA certificate (no basicConstraints CA:true): give \
         the CA that signed the serving certificate, e.g. `certs`' ca.crt"
    )]
    NotCa { index: usize, subject: String },
}

/// The DER of each certificate in a PEM CA bundle, in order. Every PEM block must be a
/// `CERTIFICATE` with basicConstraints CA:true; text between blocks is ignored, as Go's
/// `AppendCertsFromPEM` (the apiserver's reader) ignores it.
///
/// # Errors
/// When there is no block, a block is not a certificate (a private key, say), or a certificate
/// is not a CA.
pub fn ca_bundle(pem: &[u8]) -> Result<Vec<Vec<u8>>, BundleError> {
    let mut out = Vec::new();
    for (i, block) in Pem::iter_from_buffer(pem).enumerate() {
        let index = i + 1;
        let block = block.map_err(|_| BundleError::Pem { index })?;
        if block.label != "CERTIFICATE" {
            return Err(BundleError::NotCertificate {
                index,
                label: block.label,
            });
        }
        let cert = block
            .parse_x509()
            .map_err(|_| BundleError::NotX509 { index })?;
        if !is_ca(&cert) {
            return Err(BundleError::NotCa {
                index,
                subject: cert.subject().to_string(),
            });
        }
        out.push(block.contents);
    }
    if out.is_empty() {
        return Err(BundleError::Empty);
    }
    Ok(out)
}

/// Of a serving certificate (DER): whether `ca` (DER) signed it, and whether its DNS names are
/// exactly `names` (in any order). Both false when it does not parse.
#[must_use]
pub fn serving_facts(der: &[u8], ca: Option<&[u8]>, names: &[String]) -> (bool, bool) {
    let Ok((_, cert)) = parse_x509_certificate(der) else {
        return (false, false);
    };
    let signed = ca
        .and_then(|ca| parse_x509_certificate(ca).ok())
        .is_some_and(|(_, ca)| {
            cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
        });
    let mut found: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    let mut wanted = names.to_vec();
    wanted.sort();
    (signed, found == wanted)
}

/// Whether `key_pem` is the private key of the certificate `der`.
#[must_use]
pub fn key_matches(der: &[u8], key_pem: &[u8]) -> bool {
    let Ok((_, cert)) = parse_x509_certificate(der) else {
        return false;
    };
    let Ok(key) = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(key_pem)) else {
        return false;
    };
    key.public_key_raw() == cert.public_key().subject_public_key.data.as_ref()
}

/// basicConstraints CA:true, present once.
pub(super) fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, generate};
    use rustls::pki_types::{CertificateDer, pem::PemObject};

    #[test]
    fn a_serving_certificate_is_checked_against_its_ca_names_and_key() {
        let (ca, other) = (Ca::new("ca", 10).unwrap(), Ca::new("ca", 10).unwrap());
        let names = vec!["w.ns.svc".to_owned(), "w".to_owned()];
        let leaf = ca.serving(&names, 5).unwrap();
        let der = |pem: &str| first_certificate(pem.as_bytes()).unwrap();
        let cert = der(&leaf.cert_pem);
        assert_eq!(
            serving_facts(
                &cert,
                Some(&der(&ca.pem())),
                &["w".into(), "w.ns.svc".into()]
            ),
            (true, true)
        );
        // Another CA of the same name did not sign it; other names do not match.
        assert_eq!(
            serving_facts(&cert, Some(&der(&other.pem())), &["x".into()]),
            (false, false)
        );
        assert!(key_matches(&cert, leaf.key_pem.as_bytes()));
        assert!(!key_matches(&cert, ca.key_pem().as_bytes()));
    }

    #[test]
    fn not_after_refuses_truncated_input() {
        assert!(not_after(&[0x30]).is_none());
        assert!(not_after(&[0x30, 0x05, 1, 2]).is_none());
        assert!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x00]).is_none());
    }

    #[test]
    fn ca_bundle_keeps_ca_certificates_in_order() {
        let (a, b) = (Ca::new("a", 10).unwrap(), Ca::new("b", 10).unwrap());
        let text = format!("# old\n{}\nnew:\n{}", a.pem(), b.pem());
        let ders = ca_bundle(text.as_bytes()).unwrap();
        let want: Vec<Vec<u8>> = [a.pem(), b.pem()]
            .iter()
            .map(|p| {
                CertificateDer::from_pem_slice(p.as_bytes())
                    .unwrap()
                    .to_vec()
            })
            .collect();
        assert_eq!(ders, want);
    }

    #[test]
    fn ca_bundle_refuses_keys_leaves_and_empty_input() {
        let g = generate(&["a.b.svc".into()], 10).unwrap();
        assert_eq!(ca_bundle(b""), Err(BundleError::Empty));
        assert_eq!(ca_bundle(b"just text\n"), Err(BundleError::Empty));
        assert_eq!(
            ca_bundle(format!("{}{}", g.ca_pem, g.key_pem).as_bytes()),
            Err(BundleError::NotCertificate {
                index: 2,
                label: "PRIVATE KEY".into()
            })
        );
        assert!(matches!(
            ca_bundle(g.cert_pem.as_bytes()),
            Err(BundleError::NotCa { index: 1, .. })
        ));
        assert_eq!(
            ca_bundle(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(BundleError::NotX509 { index: 1 })
        );
    }
}
