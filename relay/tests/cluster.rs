//! Several relay nodes sharing one key (issue 16): what a node must not do to a sibling's
//! connections.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keyway_relay::cluster::NodeId;
use tokio::net::UdpSocket;

/// An open-policy relay presenting `key` as node `node` (`None`: a single relay).
async fn node(key: &Identity, node: Option<&str>) -> RelayHandle {
    let mut config = RelayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        key.duplicate(),
        NamePolicy::Open { state_file: None },
    );
    config.node_id = node.map(|n| NodeId::new(n).unwrap());
    Relay::start(config).await.unwrap()
}

/// A UDP hop between one client and two relays that sends the client's packets to node 1 or,
/// once `to_second` is set, to node 2 (what a load balancer remap or an anycast route change
/// does), and every relay's answer back to the client. Counts what node 2 saw and said.
struct Remap {
    addr: SocketAddr,
    to_second: Arc<AtomicBool>,
    sent_to_second: Arc<AtomicUsize>,
    heard_from_second: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Remap {
    async fn start(first: SocketAddr, second: SocketAddr) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let to_second = Arc::new(AtomicBool::new(false));
        let sent_to_second = Arc::new(AtomicUsize::new(0));
        let heard_from_second = Arc::new(AtomicUsize::new(0));
        let (flag, sent, heard) = (to_second.clone(), sent_to_second.clone(), heard_from_second.clone());
        let task = tokio::spawn(async move {
            let mut client = None;
            let mut buf = vec![0u8; 65536];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let Some(packet) = buf.get(..len) else { continue };
                if from == first || from == second {
                    if from == second {
                        heard.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Some(client) = client {
                        let _ = socket.send_to(packet, client).await;
                    }
                } else {
                    client = Some(from);
                    let target = if flag.load(Ordering::SeqCst) {
                        sent.fetch_add(1, Ordering::SeqCst);
                        second
                    } else {
                        first
                    };
                    let _ = socket.send_to(packet, target).await;
                }
            }
        });
        Self { addr, to_second, sent_to_second, heard_from_second, task }
    }
}

impl Drop for Remap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection to node 1 through `remap`, sending a keep-alive every 20 ms so that packets
/// keep flowing while they go to node 2.
async fn chatty_connection(remap: &Remap, key: PublicKey) -> (quinn::Endpoint, Connection) {
    let endpoint = raw::endpoint();
    let mut config = raw::client_config(&identity(), key).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(20)));
    transport.max_idle_timeout(Some(raw::IDLE_TIMEOUT.try_into().unwrap()));
    config.transport_config(Arc::new(transport));
    let conn = within("handshake with node 1", raw::dial_with(&endpoint, remap.addr, config)).await.unwrap();
    (endpoint, conn)
}

#[tokio::test]
async fn a_packet_of_node_1s_connection_delivered_to_node_2_does_not_reset_it() {
    let key = identity();
    let node1 = node(&key, Some("node-1")).await;
    let node2 = node(&key, Some("node-2")).await;
    let remap = Remap::start(node1.local_addr(), node2.local_addr()).await;
    let (_endpoint, conn) = chatty_connection(&remap, key.public_key()).await;

    remap.to_second.store(true, Ordering::SeqCst);
    eventually("node 2 receives packets of node 1's connection", || async {
        (remap.sent_to_second.load(Ordering::SeqCst) >= 10).then_some(())
    })
    .await;
    remap.to_second.store(false, Ordering::SeqCst);

    // Back on node 1, the connection still works: a registration there is answered.
    let (_control, answer) = register(&conn, "home", &[], false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });
    assert!(conn.close_reason().is_none(), "the connection is alive: {:?}", conn.close_reason());
    assert_eq!(remap.heard_from_second.load(Ordering::SeqCst), 0, "node 2 answered nothing, no reset");
    node1.shutdown().await;
    node2.shutdown().await;
}

/// The control case, which shows the test above can fail: two relays with one key and the same
/// (here: no) node id derive the same secrets, so the second resets the first's connection.
#[tokio::test]
async fn without_node_ids_a_sibling_resets_the_connection_which_is_why_nodes_have_ids() {
    let key = identity();
    let node1 = node(&key, None).await;
    let node2 = node(&key, None).await;
    let remap = Remap::start(node1.local_addr(), node2.local_addr()).await;
    let (_endpoint, conn) = chatty_connection(&remap, key.public_key()).await;

    remap.to_second.store(true, Ordering::SeqCst);
    let error = within("the sibling's reset", conn.closed()).await;
    assert_eq!(error, quinn::ConnectionError::Reset);
    assert!(remap.heard_from_second.load(Ordering::SeqCst) >= 1);
    node1.shutdown().await;
    node2.shutdown().await;
}
