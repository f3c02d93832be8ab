//! `outpost-webhook certs`: writes a CA and a serving certificate for the webhook's Service, or
//! a new serving certificate from an existing CA.
//!
//! Reads the CA files it is given and writes files. Key files are created with mode 0600 before
//! any key byte is written, and no existing file is replaced without `--force`.

use std::{
    fs::OpenOptions,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use clap::Args;

use crate::pki::{self, Ca, PkiError};

/// Longest serving certificate `--days` allows: ten years.
pub const MAX_DAYS: u32 = 3650;
/// Longest CA `--ca-days` allows: a hundred years.
pub const MAX_CA_DAYS: u32 = 36_500;

/// Flags of `certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// The webhook's Service name.
    #[arg(long, default_value = "outpost-webhook")]
    pub service: String,
    /// The webhook's namespace.
    #[arg(long, default_value = "outpost-webhook")]
    pub namespace: String,
    /// The directory to write to (created if missing). Key files are written with mode 0600.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// An extra subject alternative name: a DNS name or an IP address (repeatable).
    #[arg(long = "san", value_name = "NAME|IP")]
    pub sans: Vec<String>,
    /// Validity of the serving certificate in days (1 to 3650). It may not outlive its CA.
    #[arg(long, default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_DAYS)))]
    pub days: u32,
    /// Validity of a new CA in days (1 to 36500): the CA outlives the serving certificates it
    /// signs, so they can be renewed without touching the webhook registration's caBundle.
    #[arg(long, default_value_t = 3650, conflicts_with = "ca_cert",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CA_DAYS)))]
    pub ca_days: u32,
    /// Sign with this existing CA certificate (PEM) instead of making a new CA; needs --ca-key.
    /// Only tls.crt and tls.key are written.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The existing CA's private key (PEM), e.g. the ca.key an earlier `certs` wrote.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Replace files that already exist in --out.
    #[arg(long)]
    pub force: bool,
}

/// Runs `certs`: writes the files and says which.
///
/// # Errors
/// When a flag is invalid, the CA cannot be used, a file exists (without `--force`) or cannot
/// be written.
pub fn execute(args: &CertsArgs) -> Result<(), CertsError> {
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => CaSource::Existing {
            cert: read(cert)?,
            key: read(key)?,
            names: format!("{} and {}", cert.display(), key.display()),
        },
        _ => CaSource::New { days: args.ca_days },
    };
    let mut sans = pki::service_dns_names(&args.service, &args.namespace);
    sans.extend(args.sans.iter().cloned());
    for path in write(&ca, &sans, args.days, &args.out, args.force)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Where the CA comes from.
pub enum CaSource {
    /// A new CA valid for `days`; its certificate and key are written as ca.crt and ca.key.
    New { days: u32 },
    /// An existing CA's PEM certificate and key; `names` names their files in errors.
    Existing {
        cert: String,
        key: String,
        names: String,
    },
}

/// Why certificates could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error(transparent)]
    Generate(#[from] PkiError),
    #[error("cannot use the CA in {names}")]
    Ca {
        names: String,
        #[source]
        source: PkiError,
    },
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: String },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(|source| CertsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Writes, into `out`, a serving certificate for `sans` valid for `days` (tls.crt, tls.key)
/// and, for a new CA, the CA (ca.crt, ca.key); returns the paths written. Nothing is written
/// when any of the files exists and `force` is false.
///
/// # Errors
/// When a SAN or a validity is invalid, the CA cannot be used, a file exists (without `force`)
/// or cannot be written.
pub fn write(
    ca: &CaSource,
    sans: &[String],
    days: u32,
    out: &Path,
    force: bool,
) -> Result<Vec<PathBuf>, CertsError> {
    let (ca, new_ca) = match ca {
        CaSource::New { days } => (Ca::new("outpost-webhook CA", *days)?, true),
        CaSource::Existing { cert, key, names } => (
            Ca::from_pem(cert, key).map_err(|source| CertsError::Ca {
                names: names.clone(),
                source,
            })?,
            false,
        ),
    };
    let leaf = ca.serving(sans, days)?;
    let mut files = vec![
        ("tls.crt", leaf.cert_pem, 0o644),
        ("tls.key", leaf.key_pem, 0o600),
    ];
    if new_ca {
        files.insert(0, ("ca.crt", ca.pem(), 0o644));
        files.insert(1, ("ca.key", ca.key_pem(), 0o600));
    }
    // Refuse before writing anything, so a refused run leaves the directory as it was.
    if !force && let Some((name, ..)) = files.iter().find(|(name, ..)| out.join(name).exists()) {
        return Err(CertsError::Exists {
            path: out.join(name).display().to_string(),
        });
    }
    std::fs::create_dir_all(out).map_err(|source| CertsError::Write {
        path: out.display().to_string(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, content, mode) in files {
        let path = out.join(name);
        let error = |source| CertsError::Write {
            path: path.display().to_string(),
            source,
        };
        // Replace, never rewrite in place: a new file gets `mode` before its first byte.
        if force {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(error(e)),
                _ => {}
            }
        }
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
