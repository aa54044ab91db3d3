//! The pairing window file: how `keyway-hub pair` (a short-lived process) tells the running
//! connector that one app may pair, without any listening socket.
//!
//! `keyway-hub pair` writes a *window file* next to `authorized_apps` (`authorized_apps.pairing`,
//! mode 0600, written to a temporary file and renamed) holding the SHA-256 of a fresh 128-bit
//! secret, the label for the new app, the expiry time and a failure count. The secret itself
//! is only printed (in the pairing code), never stored: a leaked window file does not let
//! anyone pair. The connector polls the file with `authorized_apps`, publishes
//! `AllowList { pairing_open: true }` while a window is open, and checks each pairing request
//! against the file as it is *at that moment* (so expiry needs no timer to be exact). A
//! successful pairing deletes the file (a code works once); [`MAX_FAILURES`] wrong secrets or
//! the expiry close it too.
//!
//! The file lives in the hub owner's own directory, so whoever can write it can also edit
//! `authorized_apps` directly: the file adds no new authority. A window file readable or
//! writable by group or others is ignored anyway, as ssh does with loose key files.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Wrong secrets tolerated before the window closes (a 128-bit secret cannot be guessed; this
/// bounds the noise and makes an attack visible).
pub const MAX_FAILURES: u32 = 5;

/// Why a window could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    #[error("pairing window file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("pairing window file {path} is not valid: {}", .source.message())]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("pairing window file {path} is not valid: {source}")]
    Encode { path: PathBuf, source: toml::ser::Error },
    #[error("pairing window file {path} is accessible by group or others (mode {mode:o}); ignoring it")]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error("cannot generate a secret: {0}")]
    Random(#[source] getrandom::Error),
}

/// One open (or formerly open) window, as stored in the file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingWindow {
    /// Lowercase hex SHA-256 of the secret.
    pub(crate) secret_sha256: String,
    /// The label the new app gets in `authorized_apps`.
    pub label: String,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_unix_ms: u64,
    /// Wrong secrets presented so far.
    pub failures: u32,
}

/// The hash is not secret, but there is no reason to print it either.
impl std::fmt::Debug for PairingWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairingWindow")
            .field("label", &self.label)
            .field("expires_unix_ms", &self.expires_unix_ms)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn hash_hex(secret: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(secret))
}

/// Compares without an early exit, so the time taken does not tell how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl PairingWindow {
    /// Open: not expired and not exhausted by wrong secrets.
    pub fn is_open(&self) -> bool {
        now_ms() < self.expires_unix_ms && self.failures < MAX_FAILURES
    }

    /// Whether `secret` is this window's secret (constant time over the hashes).
    pub fn matches(&self, secret: &[u8]) -> bool {
        constant_time_eq(hash_hex(secret).as_bytes(), self.secret_sha256.as_bytes())
    }

    /// Time left before expiry.
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.expires_unix_ms.saturating_sub(now_ms()))
    }
}

/// Where the window file of the hub whose allow-list is `apps_file` lives.
pub fn window_path(apps_file: &Path) -> PathBuf {
    let mut name =
        apps_file.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "authorized_apps".into());
    name.push(".pairing");
    apps_file.with_file_name(name)
}

/// Reads the window file; `Ok(None)` if there is none.
pub fn read_window(path: &Path) -> Result<Option<PairingWindow>, PairingError> {
    let io = |source| PairingError::Io { path: path.into(), source };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(PairingError::LoosePermissions { path: path.into(), mode });
        }
    }
    toml::from_str(&text).map(Some).map_err(|source| PairingError::Parse { path: path.into(), source })
}

/// Writes the window file atomically with mode 0600.
pub fn write_window(path: &Path, window: &PairingWindow) -> Result<(), PairingError> {
    let text =
        toml::to_string(window).map_err(|source| PairingError::Encode { path: path.into(), source })?;
    keyway_proto::files::write_atomically(path, text.as_bytes(), 0o600)
        .map_err(|source| PairingError::Io { path: path.into(), source })
}

/// Removes the window file (a missing file is fine).
pub fn close_window(path: &Path) -> Result<(), PairingError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PairingError::Io { path: path.into(), source }),
    }
}

/// Opens a window for the hub whose allow-list is `apps_file` (replacing any open one) and
/// returns the fresh secret, to be put in the pairing code and nowhere else.
pub fn open_window(apps_file: &Path, label: &str, ttl: Duration) -> Result<Vec<u8>, PairingError> {
    let mut secret = vec![0u8; keyway_proto::pairing::SECRET_LEN];
    getrandom::fill(&mut secret).map_err(PairingError::Random)?;
    let window = PairingWindow {
        secret_sha256: hash_hex(&secret),
        label: crate::apps::clean_label(label),
        expires_unix_ms: now_ms().saturating_add(ttl.as_millis() as u64),
        failures: 0,
    };
    write_window(&window_path(apps_file), &window)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_lifecycle_and_secret_check() {
        let dir = tempfile::tempdir().unwrap();
        let apps = dir.path().join("authorized_apps");
        let path = window_path(&apps);
        assert_eq!(path, dir.path().join("authorized_apps.pairing"));
        assert!(read_window(&path).unwrap().is_none());
        let secret = open_window(&apps, "Anna's\nphone", Duration::from_secs(600)).unwrap();
        assert_eq!(secret.len(), 16);
        let w = read_window(&path).unwrap().unwrap();
        assert!(w.is_open() && w.matches(&secret) && !w.matches(b"guess"));
        assert_eq!(w.label, "Anna'sphone");
        let text = std::fs::read_to_string(&path).unwrap();
        let b32 = data_encoding::BASE32_NOPAD.encode(&secret).to_ascii_lowercase();
        assert!(!text.contains(&b32) && !format!("{w:?}").contains(&w.secret_sha256));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(read_window(&path), Err(PairingError::LoosePermissions { .. })));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let exhausted = PairingWindow { failures: MAX_FAILURES, ..w.clone() };
        assert!(!exhausted.is_open());
        let expired = PairingWindow { expires_unix_ms: now_ms() - 1, ..w };
        assert!(!expired.is_open());
        close_window(&path).unwrap();
        close_window(&path).unwrap();
        assert!(read_window(&path).unwrap().is_none());
    }
}
