//! Every way a session or a registration can be refused gives its own typed error and message.

use std::time::Duration;

use keyway_client::ClientError;
use keyway_e2e::*;
use keyway_hub::TunnelStatus;
use keyway_proto::RefusalReason;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_relay_key_names_both_fingerprints() {
    let relay = TestRelay::start(&[]).await;
    let wrong = identity().public_key();
    let client =
        keyway_client::Client::new(keyway_client::ClientConfig::new(identity(), relay.addr(), wrong))
            .unwrap();
    let err = client.connect(&name("home"), &identity().public_key()).await.expect_err("must fail");
    match &err {
        ClientError::RelayKeyMismatch(m) => {
            assert_eq!(m.expected, wrong);
            assert_eq!(m.seen, relay.key());
        }
        other => panic!("expected RelayKeyMismatch, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&wrong.fingerprint()) && text.contains(&relay.key().fingerprint()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_refusals_are_typed() {
    let (hub_id, app_id, stranger) = (identity(), identity(), identity());
    let offline_hub = identity();
    let relay = TestRelay::start(&[("home", hub_id.public_key()), ("cabin", offline_hub.public_key())]).await;
    let service = echo_service(b"").await;
    let (hub, _) = start_hub(&relay, "home", hub_id.duplicate(), &[app_id.public_key()], service).await;
    hub.wait_registered(PATIENCE).await.unwrap();

    let app = client(&relay, app_id);
    let refusal = |r: Result<keyway_client::HubStream, ClientError>| match r {
        Err(e) => {
            let reason = e.refusal().unwrap_or_else(|| panic!("expected a typed refusal, got {e:?}"));
            (reason, e.to_string())
        }
        Ok(_) => panic!("expected a refusal, got a session"),
    };

    let (reason, text) = refusal(app.connect(&name("nowhere"), &hub_id.public_key()).await);
    assert_eq!(reason, RefusalReason::UnknownHub);
    assert!(text.contains("nowhere"), "{text}");

    let wrong_key = identity().public_key();
    let (reason, text) = refusal(app.connect(&name("home"), &wrong_key).await);
    assert_eq!(reason, RefusalReason::HubKeyMismatch);
    assert!(text.contains(&hub_id.public_key().fingerprint()), "{text}");

    let (reason, text) = refusal(app.connect(&name("cabin"), &offline_hub.public_key()).await);
    assert_eq!(reason, RefusalReason::HubOffline);
    assert!(text.contains("cabin"), "{text}");

    // An app the hub does not allow is refused by the relay; the hub never hears of it.
    let before = hub.stats().sessions_announced();
    let (reason, _) = refusal(client(&relay, stranger).connect(&name("home"), &hub_id.public_key()).await);
    assert_eq!(reason, RefusalReason::AppNotAuthorized);
    assert_eq!(hub.stats().sessions_announced(), before, "the hub was contacted for an unauthorized app");

    let stats = relay.handle.stats();
    for r in [
        RefusalReason::UnknownHub,
        RefusalReason::HubKeyMismatch,
        RefusalReason::HubOffline,
        RefusalReason::AppNotAuthorized,
    ] {
        assert_eq!(stats.refusals(r), 1, "{r} counted once");
    }
    // The legitimate app still works after all that.
    app.connect(&name("home"), &hub_id.public_key()).await.expect("authorized session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_claimed_by_another_key_is_refused() {
    let (owner, thief) = (identity(), identity());
    let relay = TestRelay::start(&[("home", owner.public_key())]).await;
    let service = echo_service(b"").await;
    let (hub, _) = start_hub(&relay, "home", thief, &[], service).await;
    let mut status = hub.status();
    let refused = tokio::time::timeout(PATIENCE, async {
        loop {
            if let TunnelStatus::Refused { reason, message } = status.borrow_and_update().clone() {
                return (reason, message);
            }
            status.changed().await.expect("status channel");
        }
    })
    .await
    .expect("hub reports the refusal");
    assert_eq!(refused.0, RefusalReason::NameClaimed);
    assert!(refused.1.contains("home"), "{}", refused.1);
    assert!(relay.handle.stats().refusals(RefusalReason::NameClaimed) >= 1);

    // A name not in authorized_hubs at all is a different refusal.
    let (stray, _) = start_hub(&relay, "stray", identity(), &[], service).await;
    let mut status = stray.status();
    let reason = tokio::time::timeout(PATIENCE, async {
        loop {
            if let TunnelStatus::Refused { reason, .. } = status.borrow_and_update().clone() {
                return reason;
            }
            status.changed().await.expect("status channel");
        }
    })
    .await
    .expect("stray hub refused");
    assert_eq!(reason, RefusalReason::NameNotAuthorized);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
