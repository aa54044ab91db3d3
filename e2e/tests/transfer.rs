//! Bytes through the whole path: app → relay → hub → local service and back, byte-exact.

use std::sync::{Arc, Mutex};

use keyway_e2e::*;
use keyway_relay::Direction;
use tokio::io::AsyncReadExt;

/// Reads and checks the service banner, then round-trips `data` and returns what came back.
async fn banner_then_echo(stream: keyway_client::HubStream, banner: &[u8], data: Vec<u8>) -> Vec<u8> {
    let (mut r, w) = tokio::io::split(stream);
    let mut got = vec![0u8; banner.len()];
    r.read_exact(&mut got).await.expect("banner");
    assert_eq!(got, banner, "session reached the wrong hub");
    round_trip(r.unsplit(w), data).await.expect("round trip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_round_trip_is_byte_exact() {
    let hub_id = identity();
    let app_id = identity();
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let service = echo_service(b"").await;
    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], service).await;
    hub.wait_registered(PATIENCE).await.expect("hub registers");

    let client = client(&relay, app_id);
    let stream = client.connect(&name("home"), &hub_id.public_key()).await.expect("session");
    let data = payload(100 << 20, 42);
    let expected = sha256(&data);
    let back = round_trip(stream, data).await.expect("round trip");
    assert_eq!(back.len(), 100 << 20);
    assert_eq!(sha256(&back), expected);
    assert!(relay.handle.stats().bytes_app_to_hub() >= 100 << 20);
    assert!(relay.handle.stats().bytes_hub_to_app() >= 100 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_sessions_to_two_hubs_do_not_cross() {
    let (hub_a, hub_b, app_id) = (identity(), identity(), identity());
    let relay = TestRelay::start(&[("alpha", hub_a.public_key()), ("beta", hub_b.public_key())]).await;
    let service_a = echo_service(b"I am alpha\n").await;
    let service_b = echo_service(b"I am beta!\n").await;
    let apps = [app_id.public_key()];
    let (ha, _) = start_hub(&relay, "alpha", hub_a.duplicate(), &apps, service_a).await;
    let (hb, _) = start_hub(&relay, "beta", hub_b.duplicate(), &apps, service_b).await;
    ha.wait_registered(PATIENCE).await.unwrap();
    hb.wait_registered(PATIENCE).await.unwrap();

    let client = Arc::new(client(&relay, app_id));
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let client = client.clone();
        let (hub, key, banner): (_, _, &'static [u8]) = if i % 2 == 0 {
            ("alpha", hub_a.public_key(), b"I am alpha\n")
        } else {
            ("beta", hub_b.public_key(), b"I am beta!\n")
        };
        tasks.push(tokio::spawn(async move {
            let stream = client.connect(&name(hub), &key).await.expect("session");
            let data = payload(256 * 1024 + i as usize, i);
            let back = banner_then_echo(stream, banner, data.clone()).await;
            assert_eq!(sha256(&back), sha256(&data), "session {i} corrupted");
        }));
    }
    for t in tasks {
        t.await.expect("session task");
    }
    assert_eq!(ha.stats().sessions_accepted(), 50);
    assert_eq!(hb.stats().sessions_accepted(), 50);
    // Each hub's 50 sessions are streams on one end-to-end connection: one channel per hub at
    // the relay (a redial after a lost connection would add one).
    assert!(relay.handle.stats().sessions_opened() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_only_ever_forwards_ciphertext() {
    let hub_id = identity();
    let app_id = identity();
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let tap_seen = seen.clone();
    let relay = TestRelay::start_with(&[("home", hub_id.public_key())], move |config| {
        config.tap = Some(Arc::new(move |_dir: Direction, bytes: &[u8]| {
            tap_seen.lock().unwrap().extend_from_slice(bytes);
        }));
    })
    .await;
    let service = echo_service(b"SERVICE-BANNER-IN-CLEAR").await;
    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], service).await;
    hub.wait_registered(PATIENCE).await.unwrap();

    let marker = b"KEYWAY-KNOWN-PLAINTEXT-0123456789";
    let data: Vec<u8> = marker.iter().copied().cycle().take(1 << 20).collect();
    let stream = client(&relay, app_id).connect(&name("home"), &hub_id.public_key()).await.unwrap();
    let back = round_trip(stream, data.clone()).await.unwrap();
    assert_eq!(&back[..23], b"SERVICE-BANNER-IN-CLEAR");
    assert_eq!(&back[23..], &data[..]);

    let seen = seen.lock().unwrap();
    // The tap really saw the session (both directions carry at least the payload)...
    assert!(seen.len() >= 2 * data.len(), "tap saw only {} bytes", seen.len());
    // ...and none of it is plaintext: neither the app's marker nor the service's banner.
    let contains = |needle: &[u8]| seen.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(&marker[..16]), "plaintext from the app crossed the relay");
    assert!(!contains(b"SERVICE-BANNER"), "plaintext from the service crossed the relay");
}
