//! `outpost-webhook certs`: writes a CA and a serving certificate for the webhook's Service.
//!
//! Writes files. Key files are created with mode 0600 before any key byte is written.

use std::{
    fs::OpenOptions,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use clap::Args;

use crate::pki::{self, PkiError};

/// Flags of `certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// The webhook's Service name.
    #[arg(long, default_value = "outpost-webhook")]
    pub service: String,
    /// The webhook's namespace.
    #[arg(long, default_value = "outpost-webhook")]
    pub namespace: String,
    /// The directory to write to (created if missing). tls.key is written with mode 0600.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// An extra subject alternative name: a DNS name or an IP address (repeatable).
    #[arg(long = "san", value_name = "NAME|IP")]
    pub sans: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// Runs `certs`: writes the files and says which.
///
/// # Errors
/// When a SAN is invalid or a file cannot be written.
pub fn execute(args: &CertsArgs) -> Result<(), CertsError> {
    for path in write(
        &args.service,
        &args.namespace,
        &args.sans,
        args.days,
        &args.out,
    )? {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Why certificates could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error(transparent)]
    Generate(#[from] PkiError),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Writes `ca.crt`, `tls.crt` and `tls.key` into `out` for Service `service` in `namespace`,
/// with `extra_sans` added, and returns their paths.
///
/// # Errors
/// When a SAN is invalid or a file cannot be written.
pub fn write(
    service: &str,
    namespace: &str,
    extra_sans: &[String],
    days: u32,
    out: &Path,
) -> Result<Vec<PathBuf>, CertsError> {
    let mut sans = pki::service_dns_names(service, namespace);
    sans.extend(extra_sans.iter().cloned());
    let generated = pki::generate(&sans, days)?;
    std::fs::create_dir_all(out).map_err(|source| CertsError::Write {
        path: out.display().to_string(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, content, mode) in [
        ("ca.crt", &generated.ca_pem, 0o644),
        ("tls.crt", &generated.cert_pem, 0o644),
        ("tls.key", &generated.key_pem, 0o600),
    ] {
        let path = out.join(name);
        let error = |source| CertsError::Write {
            path: path.display().to_string(),
            source,
        };
        // Replace, never append to, an existing file; a new file gets `mode` from the start.
        let _ = std::fs::remove_file(&path);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(error)?;
        file.write_all(content.as_bytes()).map_err(error)?;
        written.push(path);
    }
    Ok(written)
}
