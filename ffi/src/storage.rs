//! [`SecureStorage`]: the state a phone must keep, behind an interface the app implements.
//!
//! A Keyway app keeps two things across launches: its key (secret) and what pairing learned
//! about each hub (public, but it must not be lost or the app has to pair again). On a phone
//! both belong in the platform's secure storage, which only the app can reach, so the library
//! asks the app through this foreign trait instead of writing files itself. [`file_storage`] is
//! the default for desktops, servers and tests: the key file and the `<key>.hubs.toml` store
//! next to it, exactly what the `keyway` CLI uses, so a key paired with `keyway pair` works
//! from Python and the other way round. TLS session tickets are not stored: they live in
//! memory for the client's lifetime (a cold start pays one full handshake per hub).

use std::path::PathBuf;
use std::sync::Arc;

use keyway_client::known_hubs::{self, KnownHubs};
use keyway_client::PairedHub;
use keyway_proto::{HubName, PublicKey};

use crate::error::KeywayError;

/// What pairing learned about one hub: enough to connect with nothing else configured.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct KnownHub {
    /// The hub's name at the relay.
    pub hub: String,
    /// The hub's public key (`kw…`), pinned by every connection.
    pub hub_key: String,
    /// The relay's address (`host:port`).
    pub relay: String,
    /// The relay's public key (`kw…`).
    pub relay_key: String,
}

impl From<&PairedHub> for KnownHub {
    fn from(p: &PairedHub) -> Self {
        Self {
            hub: p.hub.to_string(),
            hub_key: p.hub_key.to_string(),
            relay: p.relay.clone(),
            relay_key: p.relay_key.to_string(),
        }
    }
}

impl KnownHub {
    pub(crate) fn to_paired(&self) -> Result<PairedHub, KeywayError> {
        Ok(PairedHub {
            relay: self.relay.clone(),
            relay_key: parse_key("relay key", &self.relay_key)?,
            hub: parse_hub(&self.hub)?,
            hub_key: parse_key("hub key", &self.hub_key)?,
        })
    }
}

pub(crate) fn parse_key(what: &str, text: &str) -> Result<PublicKey, KeywayError> {
    text.trim().parse().map_err(|e| KeywayError::bad_argument(what, e))
}

pub(crate) fn parse_hub(name: &str) -> Result<HubName, KeywayError> {
    name.parse().map_err(|e| KeywayError::bad_argument("hub name", e))
}

/// Where an app keeps its key and its known hubs (the platform's secure storage).
/// Implemented by the app in Kotlin, Swift or Python; [`file_storage`] is the file-based one.
#[uniffi::export(with_foreign)]
pub trait SecureStorage: Send + Sync + std::fmt::Debug {
    /// The key bytes stored earlier with `store_key`, or nothing if there are none yet.
    fn load_key(&self) -> Result<Option<Vec<u8>>, KeywayError>;
    /// Keeps the key bytes (secret: PKCS#8 DER).
    fn store_key(&self, key: Vec<u8>) -> Result<(), KeywayError>;
    /// Every hub stored with `store_hubs` (empty if none).
    fn load_hubs(&self) -> Result<Vec<KnownHub>, KeywayError>;
    /// Replaces the stored hubs with `hubs`.
    fn store_hubs(&self, hubs: Vec<KnownHub>) -> Result<(), KeywayError>;
}

/// The file-based storage: the key file at `key_path` (PKCS#8 PEM, 0600) and the known hubs in
/// `<key_path>.hubs.toml`, as the `keyway` CLI keeps them.
#[uniffi::export]
pub fn file_storage(key_path: String) -> Arc<dyn SecureStorage> {
    Arc::new(FileStorage { key_path: PathBuf::from(key_path) })
}

#[derive(Debug)]
struct FileStorage {
    key_path: PathBuf,
}

impl FileStorage {
    fn hubs(&self) -> Result<KnownHubs, KeywayError> {
        KnownHubs::load(&known_hubs::path_for_key(&self.key_path))
            .map_err(|e| KeywayError::Storage { detail: e.to_string() })
    }
}

impl SecureStorage for FileStorage {
    fn load_key(&self) -> Result<Option<Vec<u8>>, KeywayError> {
        match std::fs::metadata(&self.key_path) {
            Ok(_) => Ok(Some(keyway_proto::Identity::load(&self.key_path)?.to_pkcs8_der()?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                Err(KeywayError::Io { detail: format!("cannot read {}: {e}", self.key_path.display()) })
            }
        }
    }

    fn store_key(&self, key: Vec<u8>) -> Result<(), KeywayError> {
        if let Some(dir) = self.key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| KeywayError::Io { detail: format!("cannot create {}: {e}", dir.display()) })?;
        }
        let identity = crate::Identity::from_bytes(key)?;
        identity.save(self.key_path.to_string_lossy().into_owned())
    }

    fn load_hubs(&self) -> Result<Vec<KnownHub>, KeywayError> {
        Ok(self.hubs()?.iter().map(KnownHub::from).collect())
    }

    fn store_hubs(&self, hubs: Vec<KnownHub>) -> Result<(), KeywayError> {
        let mut store = self.hubs()?;
        store.clear();
        for hub in &hubs {
            store.insert(hub.to_paired()?);
        }
        store.save().map_err(|e| KeywayError::Storage { detail: e.to_string() })
    }
}
