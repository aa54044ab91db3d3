//! The app's `known_hubs` store: what pairing learned about each hub, like ssh's `known_hosts`.
//!
//! After `keyway pair`, the relay address and key and the hub key are recorded under the hub's
//! name, so `keyway forward --hub NAME --key FILE` needs nothing else. The store lives next to
//! the app key (`FILE.hubs.toml`) because what it records is only meaningful for that key
//! (the hub authorized *that* key). It holds public information only, but is still written
//! 0600 via a temporary file and a rename, so a crash never leaves half a file.
//!
//! ```toml
//! [hubs.home]
//! relay = "relay.example:4433"
//! relay_key = "kw…"
//! hub_key = "kw…"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keyway_proto::{HubName, PublicKey};
use serde::{Deserialize, Serialize};

use crate::pairing::PairedHub;

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KnownHubsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// (The message alone, without toml's multi-line snippet of the file.)
    #[error("{path} is not a valid hubs file: {}", source.message())]
    Toml { path: PathBuf, source: toml::de::Error },
    #[error("{path} is not a valid hubs file: hub {name}: {source}")]
    BadHub { path: PathBuf, name: String, source: keyway_proto::FrameError },
    #[error("{path} is not a valid hubs file: hub {name}: {field}: {source}")]
    BadKey { path: PathBuf, name: String, field: &'static str, source: keyway_proto::IdentityError },
    /// The store could not be serialized (a bug, not a user error).
    #[error("{path} is not a valid hubs file: {source}")]
    Serialize { path: PathBuf, source: toml::ser::Error },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default)]
    hubs: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    relay: String,
    relay_key: String,
    hub_key: String,
}

/// The store for one app key.
#[derive(Debug)]
pub struct KnownHubs {
    path: PathBuf,
    hubs: BTreeMap<HubName, PairedHub>,
}

/// Where the store of the app key `key_file` lives.
pub fn path_for_key(key_file: &Path) -> PathBuf {
    let mut name = key_file.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "keyway".into());
    name.push(".hubs.toml");
    key_file.with_file_name(name)
}

impl KnownHubs {
    /// Loads the store (a missing file is an empty store).
    pub fn load(path: &Path) -> Result<Self, KnownHubsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(KnownHubsError::Read { path: path.into(), source }),
        };
        let file: File =
            toml::from_str(&text).map_err(|source| KnownHubsError::Toml { path: path.into(), source })?;
        let mut hubs = BTreeMap::new();
        for (name, e) in file.hubs {
            let hub: HubName = name.parse().map_err(|source| KnownHubsError::BadHub {
                path: path.into(),
                name: name.clone(),
                source,
            })?;
            let key = |k: &str, field: &'static str| {
                k.parse::<PublicKey>().map_err(|source| KnownHubsError::BadKey {
                    path: path.into(),
                    name: name.clone(),
                    field,
                    source,
                })
            };
            let paired = PairedHub {
                relay: e.relay,
                relay_key: key(&e.relay_key, "relay_key")?,
                hub: hub.clone(),
                hub_key: key(&e.hub_key, "hub_key")?,
            };
            hubs.insert(hub, paired);
        }
        Ok(Self { path: path.into(), hubs })
    }

    /// What is known about `hub`.
    pub fn get(&self, hub: &HubName) -> Option<&PairedHub> {
        self.hubs.get(hub)
    }

    /// Every hub, by name.
    pub fn iter(&self) -> impl Iterator<Item = &PairedHub> {
        self.hubs.values()
    }

    /// Forgets every hub (a store being replaced whole, as the FFI's storage interface does).
    pub fn clear(&mut self) {
        self.hubs.clear();
    }

    /// Records (or replaces) a hub.
    pub fn insert(&mut self, paired: PairedHub) {
        self.hubs.insert(paired.hub.clone(), paired);
    }

    /// Writes the store atomically (temporary file, then rename), mode 0600.
    pub fn save(&self) -> Result<(), KnownHubsError> {
        let file = File {
            hubs: self
                .hubs
                .iter()
                .map(|(name, h)| {
                    let entry = Entry {
                        relay: h.relay.clone(),
                        relay_key: h.relay_key.to_string(),
                        hub_key: h.hub_key.to_string(),
                    };
                    (name.to_string(), entry)
                })
                .collect(),
        };
        let text = toml::to_string(&file)
            .map_err(|source| KnownHubsError::Serialize { path: self.path.clone(), source })?;
        keyway_proto::files::write_atomically(&self.path, text.as_bytes(), 0o600)
            .map_err(|source| KnownHubsError::Write { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;

    #[test]
    fn store_round_trips_and_lives_next_to_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for_key(&dir.path().join("app.key"));
        assert_eq!(path, dir.path().join("app.key.hubs.toml"));
        let mut hubs = KnownHubs::load(&path).unwrap();
        let home = HubName::new("home").unwrap();
        assert!(hubs.get(&home).is_none());
        let paired = PairedHub {
            relay: "[::1]:4433".into(),
            relay_key: Identity::from_seed([1; 32]).public_key(),
            hub: home.clone(),
            hub_key: Identity::from_seed([2; 32]).public_key(),
        };
        hubs.insert(paired.clone());
        hubs.save().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(KnownHubs::load(&path).unwrap().get(&home), Some(&paired));
        std::fs::write(&path, "[hubs.home]\nrelay = \"x:1\"\nrelay_key = \"nope\"\nhub_key = \"nope\"\n")
            .unwrap();
        let err = KnownHubs::load(&path).unwrap_err();
        assert!(err.to_string().contains("relay_key"), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("{} is not a valid hubs file: hub home: relay_key: ", path.display())),
            "{err}"
        );
        std::fs::write(&path, "[hubs.home\n").unwrap();
        assert!(matches!(KnownHubs::load(&path), Err(KnownHubsError::Toml { .. })));
    }
}
