//! [`Identity`]: the app's Ed25519 key, as the foreign side holds it.
//!
//! Phones keep the key in their secure storage (Keychain, Android Keystore-wrapped prefs), so
//! besides key files (PKCS#8 PEM, written 0600, refused when group/world-readable) the key has
//! a byte form: PKCS#8 DER ([`Identity::to_bytes`]); [`Identity::from_bytes`] also takes a bare
//! 32-byte seed. The public key's text form is the one used everywhere: `kw` + 52 base32
//! characters.

use std::path::Path;
use std::sync::Arc;

use crate::error::KeywayError;
use crate::storage::SecureStorage;

/// Length of a bare Ed25519 seed, the other byte form [`Identity::from_bytes`] accepts.
const SEED_LEN: usize = 32;

/// The app's key pair. Its private half never appears in any text or debug output.
#[derive(Debug, uniffi::Object)]
pub struct Identity {
    inner: keyway_proto::Identity,
}

impl Identity {
    /// A copy of the Rust identity (each client endpoint owns one).
    pub(crate) fn key(&self) -> keyway_proto::Identity {
        self.inner.duplicate()
    }
}

#[uniffi::export]
impl Identity {
    /// A new random key.
    #[uniffi::constructor]
    pub fn generate() -> Result<Arc<Self>, KeywayError> {
        Ok(Arc::new(Self { inner: keyway_proto::Identity::generate()? }))
    }

    /// Loads a key file (PKCS#8 PEM, as `keyway keygen` writes); a file readable by group or
    /// others is refused.
    #[uniffi::constructor]
    pub fn load(path: String) -> Result<Arc<Self>, KeywayError> {
        Ok(Arc::new(Self { inner: keyway_proto::Identity::load(Path::new(&path))? }))
    }

    /// Loads the key file at `path`, creating it (0600) if it does not exist.
    #[uniffi::constructor]
    pub fn load_or_create(path: String) -> Result<Arc<Self>, KeywayError> {
        let (inner, _created) = keyway_proto::Identity::load_or_create(Path::new(&path))?;
        Ok(Arc::new(Self { inner }))
    }

    /// A key from its byte form: PKCS#8 DER (what [`Identity::to_bytes`] returns) or a bare
    /// 32-byte Ed25519 seed.
    #[uniffi::constructor]
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Arc<Self>, KeywayError> {
        let inner = match <[u8; SEED_LEN]>::try_from(bytes.as_slice()) {
            Ok(seed) => keyway_proto::Identity::from_seed(seed),
            Err(_) => keyway_proto::Identity::from_pkcs8_der(&bytes)?,
        };
        Ok(Arc::new(Self { inner }))
    }

    /// The key kept in `storage`, or a new one stored there if it holds none yet.
    #[uniffi::constructor]
    pub fn from_storage(storage: Arc<dyn SecureStorage>) -> Result<Arc<Self>, KeywayError> {
        if let Some(bytes) = storage.load_key()? {
            return Self::from_bytes(bytes);
        }
        let identity = Self::generate()?;
        storage.store_key(identity.to_bytes()?)?;
        Ok(identity)
    }

    /// Writes the key file (PKCS#8 PEM, mode 0600); refuses to overwrite an existing file.
    pub fn save(&self, path: String) -> Result<(), KeywayError> {
        Ok(self.inner.save(Path::new(&path))?)
    }

    /// The private key as PKCS#8 DER, for the platform's secure storage. Secret: never log it.
    pub fn to_bytes(&self) -> Result<Vec<u8>, KeywayError> {
        Ok(self.inner.to_pkcs8_der()?)
    }

    /// The public key's text form (`kw…`), what the hub owner adds to `authorized_apps`.
    pub fn public_key(&self) -> String {
        self.inner.public_key().to_string()
    }

    /// The short `SHA256:` fingerprint of the public key, for humans to compare.
    pub fn fingerprint(&self) -> String {
        self.inner.public_key().fingerprint()
    }
}
