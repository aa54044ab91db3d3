//! The two text files owners edit by hand: the relay's `authorized_hubs` and the hub's
//! `authorized_apps`, in the spirit of ssh's `authorized_keys`.
//!
//! ```text
//! # authorized_hubs: one "NAME KEY" per line
//! home   kwabc…
//!
//! # authorized_apps: one "KEY [LABEL…]" per line
//! kwdef…  Anna's phone
//! ```
//!
//! Blank lines and `#` comments are ignored. Parsing is pure and reports the first bad line
//! with its number, so a typo never silently drops a hub or an app.

use std::collections::BTreeMap;

use crate::codec::HubName;
use crate::identity::PublicKey;

/// A line of a list file that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct ListError {
    pub line: usize,
    pub why: String,
}

fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// Parses `authorized_hubs`: which key may register which name. A name listed twice is an
/// error (which line should win is not something to guess).
pub fn parse_authorized_hubs(text: &str) -> Result<BTreeMap<HubName, PublicKey>, ListError> {
    let mut hubs = BTreeMap::new();
    for (line, content) in content_lines(text) {
        let mut words = content.split_whitespace();
        let (Some(name), Some(key), None) = (words.next(), words.next(), words.next()) else {
            return Err(ListError { line, why: "expected \"NAME KEY\"".into() });
        };
        let name = HubName::new(name).map_err(|e| ListError { line, why: e.to_string() })?;
        let key: PublicKey =
            key.parse().map_err(|e: crate::IdentityError| ListError { line, why: e.to_string() })?;
        if hubs.insert(name.clone(), key).is_some() {
            return Err(ListError { line, why: format!("hub name {name} is listed twice") });
        }
    }
    Ok(hubs)
}

/// One authorized app: its key and the owner's label for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppEntry {
    pub key: PublicKey,
    pub label: String,
}

/// Parses `authorized_apps`. A key listed twice keeps its first label.
pub fn parse_authorized_apps(text: &str) -> Result<Vec<AppEntry>, ListError> {
    let mut apps: Vec<AppEntry> = Vec::new();
    for (line, content) in content_lines(text) {
        let (key, label) = content.split_once(char::is_whitespace).unwrap_or((content, ""));
        let key: PublicKey =
            key.parse().map_err(|e: crate::IdentityError| ListError { line, why: e.to_string() })?;
        if !apps.iter().any(|a| a.key == key) {
            apps.push(AppEntry { key, label: label.trim().to_owned() });
        }
    }
    Ok(apps)
}

/// Renders `authorized_apps` back to text (used when pairing adds or revocation removes a key).
pub fn format_authorized_apps(apps: &[AppEntry]) -> String {
    let mut out = String::from("# Keyway authorized_apps: one \"KEY [LABEL]\" per line.\n");
    for app in apps {
        let label: String = app.label.chars().filter(|c| !c.is_control()).collect();
        if label.is_empty() {
            out.push_str(&format!("{}\n", app.key));
        } else {
            out.push_str(&format!("{} {}\n", app.key, label));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public_key()
    }

    #[test]
    fn hubs_file_parses_and_reports_bad_lines() {
        let text = format!("# comment\n\nhome {}\n  office\t{}  \n", key(1), key(2));
        let hubs = parse_authorized_hubs(&text).unwrap();
        assert_eq!(hubs.len(), 2);
        assert_eq!(hubs[&HubName::new("home").unwrap()], key(1));

        let err = parse_authorized_hubs(&format!("home {}\nHome {}", key(1), key(2))).unwrap_err();
        assert_eq!(err.line, 2);
        let err = parse_authorized_hubs(&format!("home {}\nhome {}", key(1), key(2))).unwrap_err();
        assert!(err.why.contains("twice"));
        assert_eq!(parse_authorized_hubs("home").unwrap_err().line, 1);
        assert_eq!(parse_authorized_hubs("home kwnope").unwrap_err().line, 1);
        assert!(parse_authorized_hubs(&format!("home {} extra", key(1))).is_err());
    }

    #[test]
    fn apps_file_round_trips_with_labels() {
        let apps = vec![
            AppEntry { key: key(1), label: "Anna's phone".into() },
            AppEntry { key: key(2), label: String::new() },
        ];
        let text = format_authorized_apps(&apps);
        assert_eq!(parse_authorized_apps(&text).unwrap(), apps);
        let err = parse_authorized_apps(&format!("{}\nbogus label", key(1))).unwrap_err();
        assert_eq!(err.line, 2);
    }

    #[test]
    fn control_characters_cannot_inject_lines() {
        let apps = vec![AppEntry { key: key(1), label: format!("x\n{} evil", key(2)) }];
        let parsed = parse_authorized_apps(&format_authorized_apps(&apps)).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].key, key(1));
    }
}
