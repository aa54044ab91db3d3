//! Name policy ([`NamePolicy`]) and authorization decisions, and the name book they read.
//!
//! The decisions ([`decide_registration`], [`decide_session`]) are pure functions of the
//! current state, so every branch (and the order of the checks, which the protocol fixes) is
//! unit-tested without a network. [`NameBook`] holds that state: the `authorized_hubs` list
//! (closed policy, re-read on change) or the first-come bindings (open policy, persisted).
//!
//! Authorization always runs against the *current* book, never against what the TLS handshake
//! saw, because resumed sessions skip the certificate verifier.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

use keyway_proto::lists::parse_authorized_hubs;
use keyway_proto::{HubName, PublicKey, RefusalReason, SessionPurpose};

/// Which hub keys may register which names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePolicy {
    /// Only `NAME KEY` pairs listed in `hubs_file` (the `authorized_hubs` file) may register.
    /// The file is re-read when it changes and on [`RelayHandle::reload`](crate::RelayHandle::reload).
    Closed { hubs_file: PathBuf },
    /// The first key to register a free name keeps it. Bindings are persisted to `state_file`
    /// (as `NAME KEY` lines) if one is given, and loaded from it at start.
    Open { state_file: Option<PathBuf> },
}

/// Why the name book's files could not be read: the relay does not start, or a reload keeps
/// the previous list. Wrapped in [`RelayError`](crate::RelayError), which the callers return.
#[derive(Debug, thiserror::Error)]
pub enum NameBookError {
    #[error("cannot read hubs file {path}: {source}")]
    HubsFileRead { path: PathBuf, source: std::io::Error },
    #[error("hubs file {path}, {source}; keeping the previous list")]
    HubsFileParse { path: PathBuf, source: keyway_proto::lists::ListError },
    #[error("cannot read bindings file {path}: {source}")]
    StateRead { path: PathBuf, source: std::io::Error },
    #[error("bindings file {path}, {source}")]
    StateParse { path: PathBuf, source: keyway_proto::lists::ListError },
}

/// A refusal to be sent on the wire as a `Refused` frame: its [`RefusalReason`] (the wire's
/// code) and the human message that goes with it. Decided by policy, admission and introduction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WireRefusal {
    pub reason: RefusalReason,
    pub message: String,
}

impl WireRefusal {
    pub fn new(reason: RefusalReason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// Which policy a decision is made under (the parts of [`NamePolicy`] that matter to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PolicyKind {
    Closed,
    Open,
}

/// Why a registration is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Closed policy: `authorized_hubs` lists this name for this key.
    Listed,
    /// Open policy: this key already holds the name.
    Bound,
    /// Open policy: the name is free and this key claims it now.
    Claim,
}

/// May `key` register `name`, given the key the name is currently listed/bound to (`bound`)?
pub(crate) fn decide_registration(
    policy: PolicyKind,
    name: &HubName,
    bound: Option<&PublicKey>,
    key: &PublicKey,
) -> Result<Admission, WireRefusal> {
    match (policy, bound) {
        (PolicyKind::Closed, None) => Err(WireRefusal::new(
            RefusalReason::NameNotAuthorized,
            format!(
                "hub name {name} is not in this relay's authorized_hubs; the relay operator must add \
                 the line \"{name} {key}\""
            ),
        )),
        (PolicyKind::Closed, Some(listed)) if listed == key => Ok(Admission::Listed),
        (PolicyKind::Open, None) => Ok(Admission::Claim),
        (PolicyKind::Open, Some(holder)) if holder == key => Ok(Admission::Bound),
        (_, Some(holder)) => Err(WireRefusal::new(
            RefusalReason::NameClaimed,
            format!(
                "hub name {name} belongs to key {} at this relay, not to key {}",
                holder.fingerprint(),
                key.fingerprint()
            ),
        )),
    }
}

/// What the relay knows about a registered hub when an app asks for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OnlineHub<'a> {
    /// The key of the connection registered under the name.
    pub key: &'a PublicKey,
    /// The app keys the hub published.
    pub allowed: &'a HashSet<PublicKey>,
    pub pairing_open: bool,
}

/// Whether the relay may announce a session of `app_key` to the hub named `name`, in the order
/// the protocol fixes: unknown name, key mismatch, offline, not authorized (or pairing closed).
/// `bound` is the key the name is listed/bound to; `online` the registered hub, if any.
pub(crate) fn decide_session(
    name: &HubName,
    bound: Option<&PublicKey>,
    pinned: &PublicKey,
    online: Option<OnlineHub<'_>>,
    app_key: &PublicKey,
    purpose: SessionPurpose,
) -> Result<(), WireRefusal> {
    let Some(bound) = bound else {
        return Err(WireRefusal::new(
            RefusalReason::UnknownHub,
            format!("no hub named {name} at this relay"),
        ));
    };
    if bound != pinned {
        return Err(WireRefusal::new(
            RefusalReason::HubKeyMismatch,
            format!(
                "hub {name} has key {} at this relay, but the app pins {}; re-pair or fix the pinned key",
                bound.fingerprint(),
                pinned.fingerprint()
            ),
        ));
    }
    // A registered connection under another key can only be a leftover of a binding that
    // changed (reload); it is not the hub the app pins.
    let Some(hub) = online.filter(|h| h.key == bound) else {
        return Err(WireRefusal::new(
            RefusalReason::HubOffline,
            format!("hub {name} is not connected to the relay right now"),
        ));
    };
    match purpose {
        SessionPurpose::Connect if hub.allowed.contains(app_key) => Ok(()),
        SessionPurpose::Connect => Err(WireRefusal::new(
            RefusalReason::AppNotAuthorized,
            format!(
                "hub {name} does not authorize app key {} ({app_key}); pair this app with the hub first",
                app_key.fingerprint()
            ),
        )),
        SessionPurpose::Pair if hub.pairing_open => Ok(()),
        SessionPurpose::Pair => Err(WireRefusal::new(
            RefusalReason::PairingClosed,
            format!("hub {name} has no pairing window open; start one with `keyway-hub pair`"),
        )),
    }
}

/// What a file looked like when last read, to notice changes by polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Self { modified: meta.modified().ok(), len: meta.len() })
    }
}

pub(crate) struct ClosedBook {
    hubs: BTreeMap<HubName, PublicKey>,
    /// Stamp of the last file version we *tried* to load (so a broken file is reported once,
    /// not every poll).
    seen: Option<FileStamp>,
}

/// The relay's name book under the configured policy.
pub(crate) enum NameBook {
    Closed { path: PathBuf, book: RwLock<ClosedBook> },
    Open { path: Option<PathBuf>, bindings: Mutex<BTreeMap<HubName, PublicKey>> },
}

/// Header of a freshly written open-policy bindings file.
const BINDINGS_HEADER: &str = "# Keyway relay name bindings (open policy): one \"NAME KEY\" per line.\n\
# Written by the relay: the first key to register a free name keeps it.\n";

impl NameBook {
    /// Loads the book for `policy`: the hubs file must be readable and valid; a missing open
    /// bindings file just means no name is bound yet.
    pub fn load(policy: &NamePolicy) -> Result<Self, NameBookError> {
        match policy {
            NamePolicy::Closed { hubs_file } => {
                let seen = FileStamp::of(hubs_file);
                let hubs = read_hubs_file(hubs_file)?;
                Ok(Self::Closed { path: hubs_file.clone(), book: RwLock::new(ClosedBook { hubs, seen }) })
            }
            NamePolicy::Open { state_file } => {
                let bindings = match state_file {
                    Some(path) => match std::fs::read_to_string(path) {
                        Ok(text) => parse_authorized_hubs(&text)
                            .map_err(|source| NameBookError::StateParse { path: path.clone(), source })?,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                        Err(source) => return Err(NameBookError::StateRead { path: path.clone(), source }),
                    },
                    None => BTreeMap::new(),
                };
                Ok(Self::Open { path: state_file.clone(), bindings: Mutex::new(bindings) })
            }
        }
    }

    /// How many names are listed or bound.
    pub fn len(&self) -> usize {
        match self {
            Self::Closed { book, .. } => book.read().map(|b| b.hubs.len()).unwrap_or(0),
            Self::Open { bindings, .. } => bindings.lock().map(|b| b.len()).unwrap_or(0),
        }
    }

    /// The key `name` is listed or bound to right now.
    /// Whether `key` is listed or bound under some name (a hub key this relay knows). A scan:
    /// admission asks only when the relay is at `max_unauthorized_connections`.
    pub fn knows_key(&self, key: &PublicKey) -> bool {
        match self {
            Self::Closed { book, .. } => book.read().is_ok_and(|b| b.hubs.values().any(|k| k == key)),
            Self::Open { bindings, .. } => bindings.lock().is_ok_and(|b| b.values().any(|k| k == key)),
        }
    }

    pub fn binding(&self, name: &HubName) -> Option<PublicKey> {
        match self {
            Self::Closed { book, .. } => book.read().ok()?.hubs.get(name).copied(),
            Self::Open { bindings, .. } => bindings.lock().ok()?.get(name).copied(),
        }
    }

    /// Every open-policy binding (none under the closed policy), which a cluster node
    /// re-asserts into its store after the store lost its state.
    pub fn open_bindings(&self) -> Vec<(HubName, PublicKey)> {
        match self {
            Self::Closed { .. } => Vec::new(),
            Self::Open { bindings, .. } => {
                bindings.lock().map(|b| b.iter().map(|(n, k)| (n.clone(), *k)).collect()).unwrap_or_default()
            }
        }
    }

    /// Whether this is the open policy (bindings are first come, first served).
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open { .. })
    }

    /// Decides a registration and, under the open policy, claims a free name atomically (two
    /// keys racing for one name cannot both win) and persists the claim before admitting it.
    pub fn admit(&self, name: &HubName, key: &PublicKey) -> Result<Admission, WireRefusal> {
        match self {
            Self::Closed { .. } => {
                decide_registration(PolicyKind::Closed, name, self.binding(name).as_ref(), key)
            }
            Self::Open { path, bindings } => {
                let mut bindings = bindings.lock().unwrap_or_else(|p| p.into_inner());
                let admission = decide_registration(PolicyKind::Open, name, bindings.get(name), key)?;
                if admission == Admission::Claim {
                    bindings.insert(name.clone(), *key);
                    if let Some(path) = path {
                        if let Err(e) = write_bindings(path, &bindings) {
                            // Unpersisted, the claim would not survive a restart and another
                            // key could take the name: refuse rather than admit half-way.
                            bindings.remove(name);
                            tracing::error!(error = %e, "cannot persist a name binding");
                            return Err(WireRefusal::new(
                                RefusalReason::Internal,
                                "the relay cannot record the name binding right now; try again later",
                            ));
                        }
                    }
                }
                Ok(admission)
            }
        }
    }

    /// Re-reads the hubs file now (closed policy; a no-op for the open policy). A file that
    /// cannot be read or parsed leaves the previous list in force.
    pub fn reload(&self) -> Result<(), NameBookError> {
        let Self::Closed { path, book } = self else { return Ok(()) };
        let seen = FileStamp::of(path);
        let result = read_hubs_file(path);
        let mut book = book.write().unwrap_or_else(|p| p.into_inner());
        book.seen = seen;
        book.hubs = result?;
        Ok(())
    }

    /// Reloads if the hubs file changed since the last attempt. `Ok(true)` if a new list is in
    /// force.
    pub fn reload_if_changed(&self) -> Result<bool, NameBookError> {
        let Self::Closed { path, book } = self else { return Ok(false) };
        let now = FileStamp::of(path);
        let last = book.read().map(|b| b.seen).unwrap_or(None);
        if now == last {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }
}

fn read_hubs_file(path: &Path) -> Result<BTreeMap<HubName, PublicKey>, NameBookError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| NameBookError::HubsFileRead { path: path.into(), source })?;
    parse_authorized_hubs(&text).map_err(|source| NameBookError::HubsFileParse { path: path.into(), source })
}

/// Writes the bindings atomically (temporary file, then rename) and durably (both synced), so
/// a crash never leaves a truncated file that would lose every binding, nor loses a claim the
/// relay already admitted.
fn write_bindings(path: &Path, bindings: &BTreeMap<HubName, PublicKey>) -> std::io::Result<()> {
    let mut text = String::from(BINDINGS_HEADER);
    for (name, key) in bindings {
        text.push_str(&format!("{name} {key}\n"));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Durable before it counts: the file's bytes, then the rename (the directory entry).
    let mut file = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public_key()
    }
    fn name(n: &str) -> HubName {
        HubName::new(n).unwrap()
    }

    #[test]
    fn closed_policy_admits_only_the_listed_key() {
        let home = name("home");
        assert_eq!(
            decide_registration(PolicyKind::Closed, &home, Some(&key(1)), &key(1)),
            Ok(Admission::Listed)
        );
        let err = decide_registration(PolicyKind::Closed, &home, None, &key(1)).unwrap_err();
        assert_eq!(err.reason, RefusalReason::NameNotAuthorized);
        assert!(err.message.contains(&format!("home {}", key(1))), "{}", err.message);
        let err = decide_registration(PolicyKind::Closed, &home, Some(&key(2)), &key(1)).unwrap_err();
        assert_eq!(err.reason, RefusalReason::NameClaimed);
        assert!(err.message.contains(&key(1).fingerprint()) && err.message.contains(&key(2).fingerprint()));
    }

    #[test]
    fn open_policy_first_key_keeps_the_name() {
        let home = name("home");
        assert_eq!(decide_registration(PolicyKind::Open, &home, None, &key(1)), Ok(Admission::Claim));
        assert_eq!(
            decide_registration(PolicyKind::Open, &home, Some(&key(1)), &key(1)),
            Ok(Admission::Bound)
        );
        let err = decide_registration(PolicyKind::Open, &home, Some(&key(1)), &key(2)).unwrap_err();
        assert_eq!(err.reason, RefusalReason::NameClaimed);
    }

    /// Every combination of the session inputs, checked against the protocol's order.
    #[test]
    fn session_checks_run_in_protocol_order() {
        let home = name("home");
        let (hub, other_hub, app, stranger) = (key(1), key(2), key(3), key(4));
        let allowed: HashSet<PublicKey> = [app].into();
        for bound in [None, Some(hub), Some(other_hub)] {
            for pinned in [hub, other_hub] {
                for online_key in [None, Some(hub), Some(other_hub)] {
                    for pairing_open in [false, true] {
                        for app_key in [app, stranger] {
                            for purpose in [SessionPurpose::Connect, SessionPurpose::Pair] {
                                let online = online_key.as_ref().map(|k| OnlineHub {
                                    key: k,
                                    allowed: &allowed,
                                    pairing_open,
                                });
                                let got =
                                    decide_session(&home, bound.as_ref(), &pinned, online, &app_key, purpose)
                                        .map_err(|r| r.reason);
                                let want = if bound.is_none() {
                                    Err(RefusalReason::UnknownHub)
                                } else if bound != Some(pinned) {
                                    Err(RefusalReason::HubKeyMismatch)
                                } else if online_key != bound {
                                    Err(RefusalReason::HubOffline)
                                } else if purpose == SessionPurpose::Pair {
                                    if pairing_open {
                                        Ok(())
                                    } else {
                                        Err(RefusalReason::PairingClosed)
                                    }
                                } else if app_key == app {
                                    Ok(())
                                } else {
                                    Err(RefusalReason::AppNotAuthorized)
                                };
                                assert_eq!(
                                    got, want,
                                    "bound={bound:?} pinned={pinned:?} online={online_key:?} \
                                     pairing={pairing_open} app={app_key:?} purpose={purpose:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn key_mismatch_names_both_fingerprints() {
        let err =
            decide_session(&name("home"), Some(&key(1)), &key(2), None, &key(3), SessionPurpose::Connect)
                .unwrap_err();
        assert_eq!(err.reason, RefusalReason::HubKeyMismatch);
        assert!(err.message.contains(&key(1).fingerprint()), "{}", err.message);
        assert!(err.message.contains(&key(2).fingerprint()), "{}", err.message);
    }

    #[test]
    fn closed_book_reloads_and_keeps_the_old_list_on_a_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_hubs");
        std::fs::write(&path, format!("home {}\n", key(1))).unwrap();
        let book = NameBook::load(&NamePolicy::Closed { hubs_file: path.clone() }).unwrap();
        assert_eq!(book.binding(&name("home")), Some(key(1)));
        assert!(!book.reload_if_changed().unwrap());

        std::fs::write(&path, format!("# changed\noffice {}\n", key(2))).unwrap();
        book.reload().unwrap();
        assert_eq!(book.binding(&name("home")), None);
        assert_eq!(book.binding(&name("office")), Some(key(2)));

        std::fs::write(&path, format!("office {}\nbroken line here\n", key(2))).unwrap();
        let err = book.reload().unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert_eq!(book.binding(&name("office")), Some(key(2)));
        // The broken version was seen: polling does not report it again and again.
        assert!(!book.reload_if_changed().unwrap());
        assert!(book.admit(&name("office"), &key(2)).is_ok());
        assert_eq!(book.admit(&name("office"), &key(1)).unwrap_err().reason, RefusalReason::NameClaimed);
    }

    #[test]
    fn missing_hubs_file_is_a_start_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = NameBook::load(&NamePolicy::Closed { hubs_file: dir.path().join("nope") }).err().unwrap();
        assert!(matches!(err, NameBookError::HubsFileRead { .. }));
    }

    #[test]
    fn open_book_persists_claims_and_loads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bindings");
        let policy = NamePolicy::Open { state_file: Some(path.clone()) };
        let book = NameBook::load(&policy).unwrap();
        assert_eq!(book.len(), 0);
        assert_eq!(book.admit(&name("home"), &key(1)), Ok(Admission::Claim));
        assert_eq!(book.admit(&name("home"), &key(1)), Ok(Admission::Bound));
        assert_eq!(book.admit(&name("home"), &key(2)).unwrap_err().reason, RefusalReason::NameClaimed);
        drop(book);

        let again = NameBook::load(&policy).unwrap();
        assert_eq!(again.binding(&name("home")), Some(key(1)));
        assert_eq!(again.admit(&name("home"), &key(2)).unwrap_err().reason, RefusalReason::NameClaimed);
        assert!(std::fs::read_to_string(&path).unwrap().starts_with('#'));
    }

    #[test]
    fn open_book_refuses_a_claim_it_cannot_persist() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: the rename fails.
        let path = dir.path().join("bindings");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), "x").unwrap();
        let book = NameBook::Open { path: Some(path), bindings: Mutex::new(BTreeMap::new()) };
        assert_eq!(book.admit(&name("home"), &key(1)).unwrap_err().reason, RefusalReason::Internal);
        assert_eq!(book.binding(&name("home")), None);
    }
}
