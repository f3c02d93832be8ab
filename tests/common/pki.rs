//! Certificates made at test time, and files laid out as the kubelet lays out a Secret volume.

use std::path::Path;

use outpost_webhook::pki;
use tempfile::TempDir;

/// A temporary directory, removed on drop.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ow-{tag}-"))
        .tempdir()
        .unwrap()
}

/// A CA and a serving certificate for the Service name and 127.0.0.1.
pub fn certs() -> pki::Generated {
    let mut sans = pki::service_dns_names("outpost-webhook", "outpost-webhook");
    sans.push("127.0.0.1".into());
    pki::generate(&sans, 30).unwrap()
}

/// Writes `tls.crt`/`tls.key` the way the kubelet lays out a Secret volume: the files are
/// links through `..data`, a link to a timestamped directory that is swapped atomically.
pub fn write_secret_volume(dir: &Path, generation: u32, cert: &str, key: &str) {
    let data = dir.join(format!("..2026_11_24_00_00_{generation:02}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("tls.crt"), cert).unwrap();
    std::fs::write(data.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        if !dir.join(f).exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(f), dir.join(f)).unwrap();
        }
    }
}
