//! The RDP listener's certificate: made on first start and kept, like the SSH host key,
//! so that clients that pinned it (FreeRDP's known_hosts2, mstsc's prompt) see the same
//! one after a restart.

use std::path::Path;

pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 of the certificate's DER, `AB:CD:…`, as clients show it.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot make the RDP certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}: not a PEM certificate")]
    NotPem(String),
}

/// Reads `rdp-cert.pem` and `rdp-key.pem` from the state directory, making them first.
pub fn load_or_create(state_dir: &Path, host: &str) -> Result<Identity, TlsError> {
    let cert_path = state_dir.join("rdp-cert.pem");
    let key_path = state_dir.join("rdp-key.pem");
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| TlsError::Io { path, source }
    };
    if !cert_path.exists() || !key_path.exists() {
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()])?;
        let mut subject = rcgen::DistinguishedName::new();
        subject.push(rcgen::DnType::CommonName, host);
        params.distinguished_name = subject;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        crate::fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
            .map_err(io(&key_path))?;
        crate::fsutil::write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
            .map_err(io(&cert_path))?;
        log::info!(target: "usher::rdp", "made the RDP certificate {}", cert_path.display());
    }
    let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
    let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
    let fingerprint =
        fingerprint(&cert_pem).ok_or_else(|| TlsError::NotPem(cert_path.display().to_string()))?;
    Ok(Identity {
        cert_pem,
        key_pem,
        fingerprint,
    })
}

fn fingerprint(cert_pem: &str) -> Option<String> {
    use base64::Engine;
    use sha2::Digest;
    let body: String = cert_pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    let digest = sha2::Sha256::digest(der);
    Some(
        digest
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("usher-rdp-tls-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = load_or_create(&dir, "host.example").unwrap();
        let again = load_or_create(&dir, "host.example").unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        assert_eq!(first.fingerprint.len(), 32 * 3 - 1);
        let mode = std::fs::metadata(dir.join("rdp-key.pem")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
