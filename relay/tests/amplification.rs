//! A channel follows its side's relay connection to a new address, but sends little there until
//! that address answers on the channel (RFC 9000 §8's anti-amplification limit): the hub's
//! relay connection moves behind a tap that rebinds, the hub never sends a channel datagram
//! from the new address, and the app keeps sending.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use keyway_proto::channel;
use keyway_test_support::tap::{Tap, Way};

/// Channel datagrams the app sends after the hub's address moved, and their payload size.
const FLOOD: usize = 200;
const PAYLOAD: usize = 1000;

fn dropped(relay: &RelayHandle, reason: &str) -> f64 {
    let name = format!("keyway_relay_channel_packets_dropped_total{{reason=\"{reason}\"}}");
    keyway_test_support::http::series(&relay.stats().encode(), &name).unwrap_or(0.0)
}

#[tokio::test]
async fn a_moved_side_that_never_answers_gets_at_most_three_times_a_datagram() {
    let (hub_id, app_id) = (identity(), identity());
    let relay = closed_relay(&[("home", hub_id.public_key())]).await;
    let h = &relay.handle;

    // The hub behind a tap, with keep-alives so its relay connection shows the new port soon.
    let tap = Tap::start(h.local_addr()).await;
    let hub_ep = raw::endpoint();
    let mut config = raw::client_config(&hub_id, h.public_key()).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(100)));
    config.transport_config(Arc::new(transport));
    let hub = within("hub handshake", raw::dial_with(&hub_ep, tap.addr(), config)).await.unwrap();
    let (_control, answer) = register(&hub, "home", &[app_id.public_key()], false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });

    // The app on a socket it also sends raw channel datagrams from.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let raw_socket = socket.try_clone().unwrap();
    let runtime = quinn::default_runtime().unwrap();
    let app_ep = quinn::Endpoint::new(Default::default(), None, socket, runtime).unwrap();
    let app =
        within("app handshake", raw::dial(&app_ep, h.local_addr(), h.public_key(), &app_id)).await.unwrap();
    let (_send, mut recv) = open_session(&app, "home", hub_id.public_key(), SessionPurpose::Connect).await;
    let _accepted = hub_accepts(&hub).await;
    let Frame::ChannelReady { channel: app_channel } = within("ready", read_frame(&mut recv)).await.unwrap()
    else {
        panic!("expected ChannelReady")
    };
    let send = |fill: u8| {
        let mut datagram = Vec::new();
        channel::encode_into(&mut datagram, app_channel, &[fill; PAYLOAD]);
        raw_socket.send_to(&datagram, h.local_addr()).unwrap();
    };
    send(1);
    eventually("the hub's first address gets the app's datagrams", || async {
        (!tap.seen(Way::FromRelay).is_empty()).then_some(())
    })
    .await;

    // The hub's port moves; its relay connection follows; nothing on the channel comes from it.
    let new = tap.rebind().await;
    eventually("the channel follows the hub's relay connection", || async {
        send(2);
        tokio::time::sleep(Duration::from_millis(20)).await;
        (tap.delivered_via(new) >= 1 || dropped(h, "unanswered_address") >= 1.0).then_some(())
    })
    .await;
    for i in 0..FLOOD {
        send(i as u8);
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    eventually("the flood is routed", || async {
        (tap.delivered_via(new) as f64 + dropped(h, "unanswered_address") >= FLOOD as f64).then_some(())
    })
    .await;
    let delivered = tap.delivered_via(new);
    println!(
        "to the unanswered address: {delivered} of {} datagrams ({} bytes each), {} dropped",
        FLOOD,
        PAYLOAD + channel::HEADER_LEN,
        dropped(h, "unanswered_address")
    );
    assert!(
        delivered * (PAYLOAD + channel::HEADER_LEN) <= 3 * 1200,
        "{delivered} datagrams of {PAYLOAD} bytes went to an address that never answered"
    );
}
