//! The FFI surface as a foreign caller sees it, against a real relay and hub on loopback:
//! every bad argument, closed-stream reuse and refusal is a typed `KeywayError`, never a
//! panic (a panic would cross into Kotlin, Swift or Python as an opaque internal error).
//! The calls run on a plain current-thread runtime, standing in for a foreign event loop: the
//! library must not depend on the caller's runtime.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::Arc;

use keyway_e2e::{echo_service, eventually, start_hub, TestRelay};
use keyway_ffi::{file_storage, pair, Client, Identity, KeywayError, Refusal, SecureStorage};

fn foreign_loop() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Ill-formed inputs of every entry point that parses text or bytes.
#[test]
fn bad_arguments_are_typed_errors() {
    let identity = Identity::generate().unwrap();
    let relay_key = Identity::generate().unwrap().public_key();
    let bad_keys = [
        "",
        "kw",
        "kwAAAA",
        "not a key",
        "kw!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        "\u{0}kw",
    ];
    for key in bad_keys {
        let e = Client::new(identity.clone(), "127.0.0.1:4433".into(), key.into()).unwrap_err();
        assert!(matches!(e, KeywayError::BadArgument { .. }), "{key:?}: {e:?}");
    }
    for addr in ["", "nowhere", "300.1.1.1:1", "127.0.0.1", "[::1"] {
        let e = Client::new(identity.clone(), addr.into(), relay_key.clone()).unwrap_err();
        assert!(matches!(e, KeywayError::BadArgument { .. }), "{addr:?}: {e:?}");
    }
    for bytes in [vec![], vec![0u8; 31], vec![0u8; 33], vec![0xff; 48], vec![0x30; 1000]] {
        let e = Identity::from_bytes(bytes.clone()).unwrap_err();
        assert!(matches!(e, KeywayError::BadArgument { .. }), "{} bytes: {e:?}", bytes.len());
    }
    let e = Identity::load("/nonexistent/app.key".into()).unwrap_err();
    assert!(matches!(e, KeywayError::Io { .. }), "{e:?}");

    let client = Client::new(identity.clone(), "127.0.0.1:9".into(), relay_key.clone()).unwrap();
    foreign_loop().block_on(async {
        for hub in ["", "Home", "-home", "a b", "x".repeat(64).as_str()] {
            let e = client.connect(hub.into(), relay_key.clone()).await.unwrap_err();
            assert!(matches!(e, KeywayError::BadArgument { .. }), "{hub:?}: {e:?}");
        }
        let e = client.connect("home".into(), "kwnope".into()).await.unwrap_err();
        assert!(matches!(e, KeywayError::BadArgument { .. }), "{e:?}");
        let e = client.forward("home".into(), relay_key.clone(), "not an addr".into()).await.unwrap_err();
        assert!(matches!(e, KeywayError::BadArgument { .. }), "{e:?}");
        for code in
            ["", "keyway://pair", "keyway://pair?relay=x", "https://example.com", "keyway://pair?\u{0}"]
        {
            let e = pair(code.into(), identity.clone(), None).await.unwrap_err();
            assert!(matches!(e, KeywayError::BadArgument { .. }), "{code:?}: {e:?}");
        }
        client.disconnect().await.unwrap();
    });
}

/// The file storage round-trips the key and the known hubs, in the CLI's files.
#[test]
fn file_storage_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("app.key");
    let storage: Arc<dyn SecureStorage> = file_storage(path.to_string_lossy().into_owned());
    assert_eq!(storage.load_key().unwrap(), None);
    let identity = Identity::from_storage(storage.clone()).unwrap();
    let again = Identity::from_storage(storage.clone()).unwrap();
    assert_eq!(identity.public_key(), again.public_key());
    assert_eq!(keyway_proto::Identity::load(&path).unwrap().public_key().to_string(), identity.public_key());
    assert_eq!(
        Identity::from_bytes(identity.to_bytes().unwrap()).unwrap().public_key(),
        identity.public_key()
    );
    let hub = keyway_ffi::KnownHub {
        hub: "home".into(),
        hub_key: Identity::generate().unwrap().public_key(),
        relay: "127.0.0.1:4433".into(),
        relay_key: Identity::generate().unwrap().public_key(),
    };
    storage.store_hubs(vec![hub.clone()]).unwrap();
    assert_eq!(storage.load_hubs().unwrap(), vec![hub.clone()]);
    let bad = keyway_ffi::KnownHub { hub_key: "kwbad".into(), ..hub };
    assert!(matches!(storage.store_hubs(vec![bad]).unwrap_err(), KeywayError::BadArgument { .. }));
}

/// A real session through the binding, then every misuse of the stream and the client.
#[test]
fn streams_refusals_and_reuse_after_close() {
    // The relay and hub run on their own runtime, like separate processes.
    let infra = tokio::runtime::Runtime::new().unwrap();
    let identity = Identity::generate().unwrap();
    let app_key: keyway_proto::PublicKey = identity.public_key().parse().unwrap();
    let hub_id = keyway_proto::Identity::generate().unwrap();
    let hub_key = hub_id.public_key();
    let (relay, _hub) = infra.block_on(async {
        let relay = TestRelay::start(&[("home", hub_key)]).await;
        let service = echo_service(b"").await;
        let hub = start_hub(&relay, "home", hub_id, &[app_key], service).await;
        (relay, hub)
    });
    let client = Client::new(identity.clone(), relay.addr().to_string(), relay.key().to_string()).unwrap();
    foreign_loop().block_on(async {
        // The hub registers at the relay shortly after it starts.
        let stream = eventually("the hub to register", || async {
            client.connect("home".into(), hub_key.to_string()).await.ok()
        })
        .await;
        assert_eq!(stream.hub_key(), hub_key.to_string());
        stream.write(b"ping".to_vec()).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            got.extend(stream.read(2).await.unwrap());
        }
        assert_eq!(got, b"ping");
        assert!(matches!(stream.read(0).await.unwrap_err(), KeywayError::BadArgument { .. }));
        // A huge read size is capped, not allocated.
        stream.write(b"x".to_vec()).await.unwrap();
        assert_eq!(stream.read(u32::MAX).await.unwrap(), b"x");
        stream.finish().await.unwrap();
        assert_eq!(stream.read(10).await.unwrap(), b"", "the echo service closes after our FIN");
        stream.shutdown().await.unwrap();
        stream.shutdown().await.unwrap();
        assert!(stream.is_closed());
        assert!(matches!(stream.read(10).await.unwrap_err(), KeywayError::StreamClosed { .. }));
        assert!(matches!(stream.write(b"x".to_vec()).await.unwrap_err(), KeywayError::StreamClosed { .. }));
        assert!(matches!(stream.finish().await.unwrap_err(), KeywayError::StreamClosed { .. }));

        // shutdown() wakes a read that is waiting for data.
        let waiting = client.connect("home".into(), hub_key.to_string()).await.unwrap();
        let reader = waiting.clone();
        let (read, ()) = tokio::join!(reader.read(10), async { waiting.shutdown().await.unwrap() });
        assert!(matches!(read.unwrap_err(), KeywayError::StreamClosed { .. }));

        // Refusals carry their reason.
        let other = Identity::generate().unwrap().public_key();
        let e = client.connect("home".into(), other).await.unwrap_err();
        assert_eq!(e.refusal(), Some(Refusal::HubKeyMismatch), "{e:?}");
        let e = client.connect("nohub".into(), hub_key.to_string()).await.unwrap_err();
        assert_eq!(e.refusal(), Some(Refusal::UnknownHub), "{e:?}");

        // Backgrounded (disconnect) and back: the next connect dials a fresh endpoint.
        client.disconnect().await.unwrap();
        client.disconnect().await.unwrap();
        let again = client.connect("home".into(), hub_key.to_string()).await.unwrap();
        again.write(b"back".to_vec()).await.unwrap();
        assert_eq!(again.read(4).await.unwrap().first(), Some(&b'b'));
        client.disconnect().await.unwrap();
    });
    drop(relay);
}

/// A relay key that does not match is a typed error naming the mismatch.
#[test]
fn wrong_relay_key_is_typed() {
    let infra = tokio::runtime::Runtime::new().unwrap();
    let relay = infra.block_on(TestRelay::start(&[]));
    let identity = Identity::generate().unwrap();
    let wrong = Identity::generate().unwrap().public_key();
    let client = Client::new(identity, relay.addr().to_string(), wrong).unwrap();
    let e = foreign_loop().block_on(client.connect("home".into(), relay.key().to_string())).unwrap_err();
    assert!(matches!(e, KeywayError::RelayKeyMismatch { .. }), "{e:?}");
}

/// The event, network and stats entry points on a client that never connected, and an event
/// stream outliving its client: answers, never a hang or a panic.
#[test]
fn events_and_stats_without_a_connection() {
    let identity = Identity::generate().unwrap();
    let relay_key = Identity::generate().unwrap().public_key();
    let client = Client::new(identity, "127.0.0.1:9".into(), relay_key).unwrap();
    assert!(client.path_stats().is_none(), "no endpoint before the first connect");
    let events = client.events();
    let rt = foreign_loop();
    rt.block_on(async {
        client.network_changed().await.unwrap();
        client.disconnect().await.unwrap();
    });
    drop(client);
    // The client is gone: the stream ends instead of waiting forever.
    assert_eq!(rt.block_on(events.next()), None);
}
