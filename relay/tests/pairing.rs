//! Pairing channels against a relay with its default limits: anyone who knows a hub's name and
//! key may open `Pair` channels while its window is open, so they are capped per hub
//! (`max_pairing_sessions_per_hub`) and cut when the hub closes the window, while the hub's
//! listed apps keep their channels.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::*;
use keyway_relay::{LimitKind, DEFAULT_MAX_PAIRING_SESSIONS_PER_HUB};

/// Opens a channel from `app` for `purpose`, has the hub accept it and reads `ChannelReady`.
async fn live_channel(
    app: &Connection,
    hub: &Connection,
    hub_key: PublicKey,
    purpose: SessionPurpose,
) -> RecvStream {
    let (send, mut recv) = open_session(app, "home", hub_key, purpose).await;
    std::mem::forget(send);
    let accepted = hub_accepts(hub).await;
    std::mem::forget(accepted);
    let ready = within("ChannelReady", read_frame(&mut recv)).await.unwrap();
    assert!(matches!(ready, Frame::ChannelReady { .. }), "{ready:?}");
    recv
}

#[tokio::test]
async fn pairing_squatters_are_capped_per_hub_and_cut_when_the_window_closes() {
    let (hub_id, app_id) = (identity(), identity());
    let relay = closed_relay(&[("home", hub_id.public_key())]).await;
    let h = &relay.handle;
    let hub_key = hub_id.public_key();
    let hub = connect(h, &hub_id).await;
    let (mut control, answer) = register(&hub, "home", &[app_id.public_key()], true).await;
    assert_eq!(answer, Frame::Registered { replaced: false });

    // A listed app's channel, then throw-away keys pairing up to the cap.
    let app = connect(h, &app_id).await;
    let mut connect_channel = live_channel(&app, &hub, hub_key, SessionPurpose::Connect).await;
    let squatter = connect(h, &identity()).await;
    let mut pairing = Vec::new();
    for _ in 0..DEFAULT_MAX_PAIRING_SESSIONS_PER_HUB {
        pairing.push(live_channel(&squatter, &hub, hub_key, SessionPurpose::Pair).await);
    }
    let other_squatter = connect(h, &identity()).await;
    let (_s, mut over) = open_session(&other_squatter, "home", hub_key, SessionPurpose::Pair).await;
    let (reason, message) = refusal_of(&mut over).await;
    assert_eq!(reason, RefusalReason::OverLimit, "{message}");
    assert!(message.contains("max_pairing_sessions_per_hub"), "{message}");
    assert_eq!(h.stats().limit_hits(LimitKind::MaxPairingSessionsPerHub), 1);

    // The hub closes its window: every pairing channel is cut, the app's channel is not.
    write_frame(
        &mut control.send,
        &Frame::AllowList { allowed_apps: vec![app_id.public_key()], pairing_open: false },
    )
    .await
    .unwrap();
    for (i, recv) in pairing.iter_mut().enumerate() {
        let end = within("the pairing channel is cut", read_frame(recv)).await;
        assert!(end.is_err(), "pairing channel {i} still open after the window closed: {end:?}");
    }
    ping(&mut control, 7).await;
    let still =
        tokio::time::timeout(std::time::Duration::from_millis(300), read_frame(&mut connect_channel)).await;
    assert!(still.is_err(), "the listed app's channel stays: {still:?}");
    // A new pairing attempt is refused as closed.
    let (_s, mut late) = open_session(&other_squatter, "home", hub_key, SessionPurpose::Pair).await;
    assert_eq!(refusal_of(&mut late).await.0, RefusalReason::PairingClosed);
}
