//! Identities: Ed25519 key pairs, the one text form of a public key, fingerprints, and key files.
//!
//! Every Keyway party (relay, hub, app) *is* an Ed25519 key. A public key has exactly one text
//! form everywhere (CLI, config files, logs): `kw` followed by the 52-character lowercase base32
//! (RFC 4648, no padding) of its 32 bytes. Humans compare the short [`PublicKey::fingerprint`].
//!
//! Private keys live in PKCS#8 PEM files written with mode 0600. Loading a key file that group
//! or others can read is refused, as ssh does, because a leaked hub or app key is a leaked
//! identity. Private key material never implements `Debug` or `Display`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};

/// Prefix of the text form: tells a Keyway key apart from any other base32 blob at a glance.
const TEXT_PREFIX: &str = "kw";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow it.
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
/// Length in bytes of an Ed25519 SubjectPublicKeyInfo, the "certificate" of RFC 7250.
pub const SPKI_LEN: usize = 44;

fn base32() -> data_encoding::Encoding {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    // The specification is a constant that is valid by construction; fall back to the standard
    // (uppercase) alphabet rather than panic if a future data-encoding release disagrees.
    spec.encoding().unwrap_or(data_encoding::BASE32_NOPAD)
}

/// Why an identity could not be parsed, loaded or stored.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Boxed: the quoted input would otherwise make every `Result<_, IdentityError>` large.
    #[error("not a Keyway public key: {0}")]
    BadPublicKey(#[source] Box<PublicKeyError>),
    #[error("cannot read key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write key file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); \
         refusing to use it. Fix with: chmod 600 {path}"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a PKCS#8 PEM Ed25519 private key")]
    BadKeyFile { path: PathBuf },
    #[error("key file {path} already exists; refusing to overwrite an identity")]
    AlreadyExists { path: PathBuf },
    #[error("the operating system random generator failed: {0}")]
    Random(#[source] getrandom::Error),
    #[error("PKCS#8 encoding of the private key failed: {0}")]
    Pkcs8Encode(#[source] Box<ed25519_dalek::pkcs8::Error>),
    /// Key bytes handed over in memory (an app's secure storage) that are not a key.
    #[error("the key bytes are not a PKCS#8 DER Ed25519 private key")]
    BadKeyBytes,
}

impl From<PublicKeyError> for IdentityError {
    fn from(e: PublicKeyError) -> Self {
        Self::BadPublicKey(Box::new(e))
    }
}

/// Why a text or byte form is not a Keyway public key (the input is quoted so that a stray
/// character or a truncated paste is visible).
#[derive(Debug, thiserror::Error)]
pub enum PublicKeyError {
    #[error("not a valid Ed25519 point")]
    NotAPoint,
    #[error("not an Ed25519 SubjectPublicKeyInfo")]
    NotSubjectPublicKeyInfo,
    #[error("{text:?} does not start with \"{TEXT_PREFIX}\"")]
    NoPrefix { text: String },
    #[error("{text:?}: {source}")]
    BadBase32 { text: String, source: data_encoding::DecodeError },
    #[error("{text:?} holds {len} bytes, not 32")]
    WrongLength { text: String, len: usize },
}

/// An Ed25519 public key: the identity of a relay, a hub or an app.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps 32 raw bytes. Fails if they are not a valid Ed25519 point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, IdentityError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| PublicKeyError::NotAPoint)?;
        Ok(Self(bytes))
    }

    /// The 32 raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The DER SubjectPublicKeyInfo that RFC 7250 puts in the TLS Certificate message.
    pub fn to_spki(&self) -> Vec<u8> {
        let mut der = Vec::with_capacity(SPKI_LEN);
        der.extend_from_slice(&ED25519_SPKI_PREFIX);
        der.extend_from_slice(&self.0);
        der
    }

    /// Parses a DER SubjectPublicKeyInfo as sent by a TLS peer; only Ed25519 is accepted.
    pub fn from_spki(der: &[u8]) -> Result<Self, IdentityError> {
        let key = der
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .filter(|rest| rest.len() == 32)
            .ok_or(PublicKeyError::NotSubjectPublicKeyInfo)?;
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(key);
        Self::from_bytes(bytes)
    }

    /// A short, human-comparable fingerprint: `SHA256:` and the first 12 bytes of the key's
    /// SHA-256 digest in unpadded base64, in the style of ssh.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.0);
        let short = digest.as_ref().get(..12).unwrap_or_default();
        format!("SHA256:{}", data_encoding::BASE64_NOPAD.encode(short))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TEXT_PREFIX}{}", base32().encode(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self)
    }
}

impl FromStr for PublicKey {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let body = s.strip_prefix(TEXT_PREFIX).ok_or_else(|| PublicKeyError::NoPrefix { text: s.into() })?;
        let raw = base32()
            .decode(body.as_bytes())
            .map_err(|source| PublicKeyError::BadBase32 { text: s.into(), source })?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|v: Vec<u8>| PublicKeyError::WrongLength { text: s.into(), len: v.len() })?;
        Self::from_bytes(bytes)
    }
}

/// A private Ed25519 key and its public half. Deliberately not `Debug`, `Display` or `Clone`
/// by accident: printing an identity prints only its public key.
pub struct Identity {
    signing: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.public_key())
    }
}

impl Identity {
    /// Generates a new key from the operating system's random generator.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(IdentityError::Random)?;
        Ok(Self { signing: SigningKey::from_bytes(&seed) })
    }

    /// Builds an identity from a 32-byte seed (tests and deterministic load generators).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self { signing: SigningKey::from_bytes(&seed) }
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// PKCS#8 v1 DER of the private key, as rustls' signing-key loaders expect.
    pub fn to_pkcs8_der(&self) -> Result<Vec<u8>, IdentityError> {
        self.signing
            .to_pkcs8_der()
            .map(|doc| doc.as_bytes().to_vec())
            .map_err(|e| IdentityError::Pkcs8Encode(Box::new(e)))
    }

    /// A 32-byte secret for one purpose, derived from the private key: HMAC-SHA256 keyed by the
    /// private seed over `label` (domain separation). Stable for a given key file, so a
    /// restarted process derives the same value, and it reveals nothing about the key.
    pub fn derive_secret(&self, label: &str) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.signing.as_bytes());
        let tag = ring::hmac::sign(&key, label.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref().get(..32).unwrap_or(&[0u8; 32]));
        out
    }

    /// Parses PKCS#8 DER, the inverse of [`Identity::to_pkcs8_der`], for keys that live in an
    /// app's secure storage (a keychain) rather than in a key file.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, IdentityError> {
        let signing = SigningKey::from_pkcs8_der(der).map_err(|_| IdentityError::BadKeyBytes)?;
        Ok(Self { signing })
    }

    /// A clone for handing the same identity to several endpoints.
    pub fn duplicate(&self) -> Self {
        Self { signing: self.signing.clone() }
    }

    /// Loads a PKCS#8 PEM key file, refusing files readable by group or others.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        check_private_permissions(path)?;
        let pem = std::fs::read_to_string(path)
            .map_err(|source| IdentityError::Read { path: path.into(), source })?;
        let signing =
            SigningKey::from_pkcs8_pem(&pem).map_err(|_| IdentityError::BadKeyFile { path: path.into() })?;
        Ok(Self { signing })
    }

    /// Writes the key as PKCS#8 PEM with mode 0600. Refuses to overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        use std::io::Write;
        let pem = self
            .signing
            .to_pkcs8_pem(Default::default())
            .map_err(|_| IdentityError::BadKeyFile { path: path.into() })?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::AlreadyExists { path: path.into() }
            } else {
                IdentityError::Write { path: path.into(), source }
            }
        })?;
        file.write_all(pem.as_bytes())
            .and_then(|_| file.sync_all())
            .map_err(|source| IdentityError::Write { path: path.into(), source })
    }

    /// Loads the key at `path`, or creates one there if the file does not exist yet.
    /// Returns whether the key was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), IdentityError> {
        match std::fs::metadata(path) {
            Ok(_) => Ok((Self::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|source| IdentityError::Write { path: dir.into(), source })?;
                }
                let identity = Self::generate()?;
                identity.save(path)?;
                Ok((identity, true))
            }
            Err(source) => Err(IdentityError::Read { path: path.into(), source }),
        }
    }

    #[cfg(test)]
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }
}

#[cfg(unix)]
fn check_private_permissions(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| IdentityError::Read { path: path.into(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::InsecurePermissions { path: path.into(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_permissions(_path: &Path) -> Result<(), IdentityError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_secrets_are_stable_per_key_and_label() {
        let a = Identity::from_seed([5; 32]);
        assert_eq!(a.derive_secret("x"), Identity::from_seed([5; 32]).derive_secret("x"));
        assert_ne!(a.derive_secret("x"), a.derive_secret("y"));
        assert_ne!(a.derive_secret("x"), Identity::from_seed([6; 32]).derive_secret("x"));
        assert_ne!(&a.derive_secret("x")[..], &[5u8; 32][..]);
    }

    #[test]
    fn text_form_round_trips_and_has_one_shape() {
        let id = Identity::from_seed([7; 32]);
        let text = id.public_key().to_string();
        assert!(text.starts_with("kw"));
        assert_eq!(text.len(), 2 + 52);
        assert!(text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        let parsed: PublicKey = text.parse().unwrap();
        assert_eq!(parsed, id.public_key());
        // Surrounding whitespace from copy-paste is tolerated.
        assert_eq!(format!("  {text}\n").parse::<PublicKey>().unwrap(), id.public_key());
    }

    #[test]
    fn malformed_text_is_refused_with_a_reason() {
        for bad in ["", "kw", "xx", "kwAAAA", "kw!!!!", &format!("kw{}", "a".repeat(60))] {
            let err = bad.parse::<PublicKey>().unwrap_err();
            assert!(matches!(err, IdentityError::BadPublicKey(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn spki_round_trip_and_rejects_other_algorithms() {
        let key = Identity::from_seed([1; 32]).public_key();
        let spki = key.to_spki();
        assert_eq!(spki.len(), SPKI_LEN);
        assert_eq!(PublicKey::from_spki(&spki).unwrap(), key);
        let mut other = spki.clone();
        other[8] = 0x71; // Ed448 OID
        assert!(PublicKey::from_spki(&other).is_err());
        assert!(PublicKey::from_spki(&spki[..40]).is_err());
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        let key = Identity::from_seed([2; 32]).public_key();
        let fp = key.fingerprint();
        assert!(fp.starts_with("SHA256:"));
        assert_eq!(fp, key.fingerprint());
        assert_ne!(fp, Identity::from_seed([3; 32]).public_key().fingerprint());
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_0600_and_loose_ones_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/app.key");
        let (id, created) = Identity::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = Identity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.public_key(), id.public_key());
        assert!(matches!(id.save(&path), Err(IdentityError::AlreadyExists { .. })));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).unwrap_err();
        assert!(matches!(err, IdentityError::InsecurePermissions { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        std::fs::write(&path, "not a key").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(matches!(Identity::load(&path), Err(IdentityError::BadKeyFile { .. })));
    }

    #[test]
    fn debug_never_shows_private_material() {
        let id = Identity::from_seed([9; 32]);
        let dbg = format!("{id:?}");
        assert!(dbg.contains(&id.public_key().to_string()));
        let pem = id.signing_key().to_pkcs8_pem(Default::default()).unwrap();
        assert!(!dbg.contains(pem.lines().nth(1).unwrap()));
    }
}
