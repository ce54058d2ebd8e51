use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;
use std::path::Path;

/// The host key, made on first start (0600) and kept, so clients' known_hosts stay valid.
pub fn load_or_create_host_key(state_dir: &Path) -> Result<PrivateKey, String> {
    let path = state_dir.join("ssh_host_ed25519_key");
    match std::fs::read_to_string(&path) {
        Ok(text) => PrivateKey::from_openssh(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
            let key = PrivateKey::from(pair);
            let text = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| format!("cannot encode the host key: {e}"))?;
            crate::fsutil::write_atomic(&path, text.as_bytes(), 0o600)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            log::info!(target: "usher::ssh", "made a new host key {}", path.display());
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The host key as an Ed25519 signing key: it also seals the recordings this host ships.
pub fn signing_key(key: &PrivateKey) -> Result<ed25519_dalek::SigningKey, String> {
    let pair = key
        .key_data()
        .ed25519()
        .ok_or("the host key is not Ed25519")?;
    Ok(ed25519_dalek::SigningKey::from_bytes(
        &pair.private.to_bytes(),
    ))
}
