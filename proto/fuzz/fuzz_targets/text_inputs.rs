//! The text inputs a hub owner or relay operator hands us: public keys, hub names and the
//! `authorized_hubs` / `authorized_apps` files. Properties: no panic; what parses round-trips.
#![no_main]

use keyway_proto::codec::HubName;
use keyway_proto::lists::{format_authorized_apps, parse_authorized_apps, parse_authorized_hubs};
use keyway_proto::PublicKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(key) = text.parse::<PublicKey>() {
        assert_eq!(key.to_string().parse::<PublicKey>().ok(), Some(key));
    }
    if let Ok(name) = HubName::new(text) {
        assert_eq!(name.as_str(), text);
    }
    let _ = parse_authorized_hubs(text);
    if let Ok(apps) = parse_authorized_apps(text) {
        let again = parse_authorized_apps(&format_authorized_apps(&apps)).expect("formatted list parses");
        assert_eq!(again.len(), apps.len());
    }
});
