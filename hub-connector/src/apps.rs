//! The `authorized_apps` file: which app keys may reach this hub, live-reloaded.
//!
//! The file is polled (mtime, size, inode) every 250 ms
//! ([`POLL_INTERVAL`](crate::POLL_INTERVAL)) rather than watched with inotify:
//! editors replace files in many ways, some filesystems have no change notification, a `stat`
//! costs nothing, and a quarter second keeps revocation well within the one-second budget. On a change the new list replaces the
//! shared [`AllowList`] (which the end-to-end TLS verifier reads), sessions of removed keys are
//! cut by the caller, and subscribers are woken so the tunnel publishes the new `AllowList`
//! frame to the relay.
//!
//! A file that no longer parses keeps the previous list (a typo while editing must not lock
//! out every phone); the error is logged with its line number. A missing file is an empty
//! list, so deleting the file revokes everyone.
//!
//! [`add_app`] and [`revoke_apps`] edit the file for `keyway-hub pair` / `apps revoke`: line by
//! line (comments and the owner's layout survive), written to a temporary file and renamed
//! over the original (the watcher never sees half a file), keeping the original's mode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

use keyway_proto::lists::{parse_authorized_apps, AppEntry};
use keyway_proto::tls::AllowList;
use keyway_proto::PublicKey;
use tokio::sync::watch;

use crate::error::HubError;

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// The outcome of a reload that changed the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppsChange {
    /// Keys that are no longer authorized (their sessions must be cut).
    pub removed: Vec<PublicKey>,
    /// Keys newly authorized.
    pub added: Vec<PublicKey>,
    /// Size of the new list.
    pub total: usize,
}

/// The live allow-list and the labels of its keys.
#[derive(Debug)]
pub struct Apps {
    path: PathBuf,
    allow: AllowList,
    labels: RwLock<HashMap<PublicKey, String>>,
    stamp: Mutex<Option<Stamp>>,
    version: watch::Sender<u64>,
}

fn stamp_of(path: &Path) -> Result<Option<Stamp>, HubError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&meta);
            #[cfg(not(unix))]
            let inode = 0;
            Ok(Some(Stamp { modified: meta.modified().ok(), len: meta.len(), inode }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HubError::AppsRead { path: path.into(), source }),
    }
}

fn read_entries(path: &Path) -> Result<Vec<AppEntry>, HubError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            parse_authorized_apps(&text).map_err(|source| HubError::Apps { path: path.into(), source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(HubError::AppsRead { path: path.into(), source }),
    }
}

impl Apps {
    /// Loads the file. At start-up a file that does not parse is an error (the owner is
    /// there to fix it); later reloads keep the old list instead.
    pub fn load(path: &Path) -> Result<Self, HubError> {
        let stamp = stamp_of(path)?;
        let entries = read_entries(path)?;
        let (version, _) = watch::channel(0);
        Ok(Self {
            path: path.into(),
            allow: AllowList::new(entries.iter().map(|e| e.key)),
            labels: RwLock::new(entries.into_iter().map(|e| (e.key, e.label)).collect()),
            stamp: Mutex::new(stamp),
            version,
        })
    }

    /// The shared allow-list (clones see every later change).
    pub fn allow_list(&self) -> AllowList {
        self.allow.clone()
    }

    /// Whether `key` is authorized right now.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.allow.contains(key)
    }

    /// The owner's label for `key` (empty if none or unknown).
    pub fn label(&self, key: &PublicKey) -> String {
        self.labels.read().ok().and_then(|l| l.get(key).cloned()).unwrap_or_default()
    }

    /// The file being watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A receiver that is marked changed whenever the list changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Re-reads the file if its stamp changed. `Ok(None)`: nothing changed. An unreadable or
    /// unparsable file is an error and leaves the current list in force.
    pub fn reload_if_changed(&self) -> Result<Option<AppsChange>, HubError> {
        let stamp = stamp_of(&self.path)?;
        {
            let Ok(mut seen) = self.stamp.lock() else { return Ok(None) };
            if *seen == stamp {
                return Ok(None);
            }
            // Record the stamp before parsing so a bad file is reported once, not on every poll.
            *seen = stamp;
        }
        let entries = read_entries(&self.path)?;
        let before = self.allow.snapshot();
        let removed = self.allow.replace(entries.iter().map(|e| e.key));
        let added: Vec<PublicKey> = entries.iter().map(|e| e.key).filter(|k| !before.contains(k)).collect();
        let total = entries.len();
        if let Ok(mut labels) = self.labels.write() {
            *labels = entries.into_iter().map(|e| (e.key, e.label)).collect();
        }
        if removed.is_empty() && added.is_empty() {
            return Ok(None);
        }
        self.version.send_modify(|v| *v = v.wrapping_add(1));
        Ok(Some(AppsChange { removed, added, total }))
    }
}

/// Which entries of `authorized_apps` a revocation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppSelector {
    Key(PublicKey),
    Label(String),
}

impl AppSelector {
    /// A `kw…` key if it parses as one, else a label.
    pub fn parse(text: &str) -> Self {
        match text.trim().parse::<PublicKey>() {
            Ok(key) => AppSelector::Key(key),
            Err(_) => AppSelector::Label(text.trim().to_owned()),
        }
    }
}

/// Why editing `authorized_apps` failed.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error(transparent)]
    Load(#[from] HubError),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("no authorized app matches {0}")]
    NoMatch(String),
    #[error("label {label:?} names {count} apps; revoke them by key (see `keyway-hub apps list`)")]
    Ambiguous { label: String, count: usize },
}

/// The entries of `authorized_apps` (a missing file is empty).
pub fn list_apps(path: &Path) -> Result<Vec<AppEntry>, HubError> {
    read_entries(path)
}

/// A label as it can be stored on one line: no control characters, trimmed.
pub fn clean_label(label: &str) -> String {
    label.chars().filter(|c| !c.is_control()).collect::<String>().trim().to_owned()
}

/// Replaces `path` with `text` atomically, keeping its mode (0644 for a new file: it holds
/// public keys only).
fn write_atomically(path: &Path, text: &str) -> Result<(), EditError> {
    // Keep the mode the owner gave the file (a new one gets 0644: it holds public keys only).
    #[cfg(unix)]
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o644)
    };
    #[cfg(not(unix))]
    let mode = 0o644;
    keyway_proto::files::write_atomically(path, text.as_bytes(), mode)
        .map_err(|source| EditError::Write { path: path.into(), source })
}

/// Appends `KEY LABEL` to `path` unless the key is already there. Returns whether it was added.
pub fn add_app(path: &Path, key: &PublicKey, label: &str) -> Result<bool, EditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(HubError::AppsRead { path: path.into(), source }.into()),
    };
    let entries =
        parse_authorized_apps(&text).map_err(|source| HubError::Apps { path: path.into(), source })?;
    if entries.iter().any(|e| e.key == *key) {
        return Ok(false);
    }
    let mut out = text;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let label = clean_label(label);
    if label.is_empty() {
        out.push_str(&format!("{key}\n"));
    } else {
        out.push_str(&format!("{key} {label}\n"));
    }
    write_atomically(path, &out)?;
    Ok(true)
}

/// Removes the entries `selector` names; a label must name exactly one app (two phones both
/// called "phone" are revoked by key, not guessed). Returns the removed entries.
pub fn revoke_apps(path: &Path, selector: &AppSelector) -> Result<Vec<AppEntry>, EditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(HubError::AppsRead { path: path.into(), source }.into()),
    };
    let entries =
        parse_authorized_apps(&text).map_err(|source| HubError::Apps { path: path.into(), source })?;
    let victims: Vec<AppEntry> = entries
        .into_iter()
        .filter(|e| match selector {
            AppSelector::Key(k) => e.key == *k,
            AppSelector::Label(l) => e.label == *l,
        })
        .collect();
    match (selector, victims.len()) {
        (AppSelector::Key(k), 0) => return Err(EditError::NoMatch(format!("key {}", k.fingerprint()))),
        (AppSelector::Label(l), 0) => return Err(EditError::NoMatch(format!("label {l:?}"))),
        (AppSelector::Label(l), n) if n > 1 => {
            return Err(EditError::Ambiguous { label: l.clone(), count: n })
        }
        _ => {}
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let revoked = !line.trim_start().starts_with('#')
            && first.parse::<PublicKey>().is_ok_and(|k| victims.iter().any(|v| v.key == k));
        if !revoked {
            out.push_str(line);
            out.push('\n');
        }
    }
    write_atomically(path, &out)?;
    Ok(victims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;

    #[test]
    fn add_and_revoke_edit_lines_and_keep_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_apps");
        std::fs::write(&path, format!("# my apps\n{} laptop\n", key(1))).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(add_app(&path, &key(2), "Anna's\nphone").unwrap());
        assert!(!add_app(&path, &key(2), "again").unwrap(), "no duplicates");
        assert!(add_app(&path, &key(3), "phone").unwrap());
        assert!(add_app(&path, &key(4), "phone").unwrap());
        let apps = list_apps(&path).unwrap();
        assert_eq!(apps.len(), 4);
        assert_eq!(apps[1].label, "Anna'sphone", "control characters cannot inject lines");

        let err = revoke_apps(&path, &AppSelector::parse("phone")).unwrap_err();
        assert!(matches!(err, EditError::Ambiguous { count: 2, .. }), "{err}");
        let gone = revoke_apps(&path, &AppSelector::parse("laptop")).unwrap();
        assert_eq!(gone[0].key, key(1));
        let gone = revoke_apps(&path, &AppSelector::parse(&key(3).to_string())).unwrap();
        assert_eq!(gone[0].label, "phone");
        assert!(matches!(revoke_apps(&path, &AppSelector::Key(key(3))), Err(EditError::NoMatch(_))));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# my apps\n"), "{text}");
        assert_eq!(list_apps(&path).unwrap().iter().map(|e| e.key).collect::<Vec<_>>(), vec![key(2), key(4)]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public_key()
    }

    /// Writes via a temp file and rename, as editors do, so the inode changes even when
    /// mtime granularity is coarse.
    fn write(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn missing_file_is_an_empty_list_and_creation_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_apps");
        let apps = Apps::load(&path).unwrap();
        assert!(apps.allow_list().is_empty());
        assert_eq!(apps.reload_if_changed().unwrap(), None);

        let mut rx = apps.subscribe();
        write(&path, &format!("{} Anna's phone\n", key(1)));
        let change = apps.reload_if_changed().unwrap().unwrap();
        assert_eq!(change, AppsChange { removed: vec![], added: vec![key(1)], total: 1 });
        assert!(apps.contains(&key(1)));
        assert_eq!(apps.label(&key(1)), "Anna's phone");
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert_eq!(apps.reload_if_changed().unwrap(), None, "unchanged file is not re-read");
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn removal_is_reported_and_shared_lists_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_apps");
        write(&path, &format!("{}\n{} tablet\n", key(1), key(2)));
        let apps = Apps::load(&path).unwrap();
        let shared = apps.allow_list();
        assert!(shared.contains(&key(1)) && shared.contains(&key(2)));

        write(&path, &format!("# revoked the phone\n{} tablet\n", key(2)));
        let change = apps.reload_if_changed().unwrap().unwrap();
        assert_eq!(change.removed, vec![key(1)]);
        assert!(change.added.is_empty());
        assert!(!shared.contains(&key(1)) && shared.contains(&key(2)));

        std::fs::remove_file(&path).unwrap();
        let change = apps.reload_if_changed().unwrap().unwrap();
        assert_eq!(change.removed, vec![key(2)]);
        assert!(shared.is_empty(), "deleting the file revokes everyone");
    }

    #[test]
    fn a_broken_file_keeps_the_old_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_apps");
        write(&path, &format!("{}\n", key(1)));
        let apps = Apps::load(&path).unwrap();
        write(&path, &format!("{}\nnot-a-key oops\n", key(1)));
        let err = apps.reload_if_changed().unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(apps.contains(&key(1)));
        // Reported once, not on every poll.
        assert_eq!(apps.reload_if_changed().unwrap(), None);
        // Fixing the file applies it.
        write(&path, &format!("{}\n", key(3)));
        let change = apps.reload_if_changed().unwrap().unwrap();
        assert_eq!((change.removed, change.added), (vec![key(1)], vec![key(3)]));
    }

    #[test]
    fn a_broken_file_at_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_apps");
        write(&path, "garbage\n");
        assert!(matches!(Apps::load(&path), Err(HubError::Apps { .. })));
    }

    #[test]
    fn label_only_edits_do_not_republish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_apps");
        write(&path, &format!("{} old\n", key(1)));
        let apps = Apps::load(&path).unwrap();
        write(&path, &format!("{} new label\n", key(1)));
        assert_eq!(apps.reload_if_changed().unwrap(), None);
        assert_eq!(apps.label(&key(1)), "new label");
    }
}
