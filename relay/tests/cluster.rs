//! Several relay nodes sharing one key (issue 16): what a node must not do to a sibling's
//! connections, and what nodes sharing a real Redis agree on (presence, newest registration
//! wins across nodes, open-policy bindings, redirects).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keyway_relay::cluster::{ClusterConfig, NodeId, StoreConfig};
use keyway_test_support::redis::{RedisSentinel, RedisServer};
use tokio::net::UdpSocket;

/// An open-policy relay presenting `key` as node `node` of the cluster whose store is `redis`.
async fn cluster_node(key: &Identity, node: &str, redis: &RedisServer) -> RelayHandle {
    cluster_node_at(key, node, redis.url()).await
}

/// [`cluster_node`] with the store at `url`.
async fn cluster_node_at(key: &Identity, node: &str, url: String) -> RelayHandle {
    let mut config = RelayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        key.duplicate(),
        NamePolicy::Open { state_file: None },
    );
    config.node_id = Some(NodeId::new(node).unwrap());
    let mut cluster = ClusterConfig::new(StoreConfig::Redis(url));
    cluster.lease = Duration::from_secs(3);
    config.cluster = Some(cluster);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    Relay::start(config).await.unwrap()
}

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
    chatty_connection_to(remap.addr, key).await
}

/// A connection through the hop at `hop` (see [`chatty_connection`]).
async fn chatty_connection_to(hop: SocketAddr, key: PublicKey) -> (quinn::Endpoint, Connection) {
    let endpoint = raw::endpoint();
    let mut config = raw::client_config(&identity(), key).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(20)));
    transport.max_idle_timeout(Some(raw::IDLE_TIMEOUT.try_into().unwrap()));
    config.transport_config(Arc::new(transport));
    let conn = within("handshake with node 1", raw::dial_with(&endpoint, hop, config)).await.unwrap();
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

/// A UDP load balancer in front of two nodes that routes as `docs/operating.md` tells an
/// operator's to: a QUIC packet whose destination connection ID names a node
/// (`keyway_proto::cid::decode`) goes to that node; any other packet (the client's first
/// Initial) by its "4-tuple hash", here simply `fallback`. Counts the client's short-header
/// packets that named node 2 and those that named no node.
struct Balancer {
    addr: SocketAddr,
    fallback_second: Arc<AtomicBool>,
    named_second: Arc<AtomicUsize>,
    unnamed_short: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(nodes: [(&str, SocketAddr); 2]) -> Self {
        use keyway_proto::cid::{decode, ServerId};
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let fallback_second = Arc::new(AtomicBool::new(true));
        let named_second = Arc::new(AtomicUsize::new(0));
        let unnamed_short = Arc::new(AtomicUsize::new(0));
        let (fallback, named, unnamed) =
            (fallback_second.clone(), named_second.clone(), unnamed_short.clone());
        let table = nodes.map(|(id, addr)| (ServerId::of_node(id), addr));
        let task = tokio::spawn(async move {
            let mut client = None;
            let mut buf = vec![0u8; 65536];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let packet = &buf[..len];
                if table.iter().any(|(_, node)| *node == from) {
                    if let Some(client) = client {
                        let _ = socket.send_to(packet, client).await;
                    }
                    continue;
                }
                client = Some(from);
                let long = packet[0] & 0x80 != 0;
                let dcid = if long {
                    let n = usize::from(packet[5]);
                    &packet[6..6 + n]
                } else {
                    &packet[1..1 + keyway_proto::cid::CID_LEN]
                };
                let target = match decode(dcid).and_then(|id| table.iter().find(|(s, _)| *s == id)) {
                    Some((_, node)) => {
                        if *node == table[1].1 && !long {
                            named.fetch_add(1, Ordering::SeqCst);
                        }
                        *node
                    }
                    None => {
                        if !long {
                            unnamed.fetch_add(1, Ordering::SeqCst);
                        }
                        table[usize::from(fallback.load(Ordering::SeqCst))].1
                    }
                };
                let _ = socket.send_to(packet, target).await;
            }
        });
        Self { addr, fallback_second, named_second, unnamed_short, task }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The connection IDs a node issues name it, so a load balancer keeps a connection on its node
/// after the peer's address changed, when a 4-tuple hash would send it to a sibling.
#[tokio::test]
async fn a_load_balancer_routing_on_connection_ids_keeps_a_migrated_connection_on_its_node() {
    let key = identity();
    let node1 = node(&key, Some("node-1")).await;
    let node2 = node(&key, Some("node-2")).await;
    let balancer = Balancer::start([("node-1", node1.local_addr()), ("node-2", node2.local_addr())]).await;
    let (endpoint, conn) = chatty_connection_to(balancer.addr, key.public_key()).await;
    let (_control, answer) = register(&conn, "home", &[], false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });
    assert_eq!(node2.stats().hubs_connected(), 1, "the first Initial went to node 2 (fallback)");

    // The peer's NAT rebinds, and its new 4-tuple hashes to node 1.
    balancer.fallback_second.store(false, Ordering::SeqCst);
    let before = balancer.named_second.load(Ordering::SeqCst);
    endpoint.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    eventually("the migrated connection's packets name node 2", || async {
        (balancer.named_second.load(Ordering::SeqCst) >= before + 10).then_some(())
    })
    .await;
    // Only the node that holds this connection's state can answer it (and knows it registered).
    let (_control, answer) = register(&conn, "other", &[], false).await;
    let Frame::Refused { reason, message } = answer else { panic!("{answer:?}") };
    assert_eq!(reason, RefusalReason::ProtocolViolation, "{message}");
    assert!(message.contains("already has a control stream"), "{message}");
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    assert_eq!((node1.stats().hubs_connected(), node2.stats().hubs_connected()), (0, 1));
    assert_eq!(balancer.unnamed_short.load(Ordering::SeqCst), 0, "every short header named its node");
    node1.shutdown().await;
    node2.shutdown().await;
}

#[tokio::test]
async fn a_registration_at_another_node_replaces_the_tunnel_at_once_and_another_key_is_refused() {
    let Some(redis) = RedisServer::start_if_available() else { return };
    let key = identity();
    let node1 = cluster_node(&key, "node-1", &redis).await;
    let node2 = cluster_node(&key, "node-2", &redis).await;
    let (hub, other) = (identity(), identity());

    let first = connect(&node1, &hub).await;
    let (_c1, answer) = register(&first, "home", &[], false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });
    assert!(redis.command("GET kw:{home}:p").contains("node-1"), "the store knows where the hub is");

    // Another key cannot take the name at the other node: the binding is cluster-wide.
    let intruder = connect(&node2, &other).await;
    let (_c, answer) = register(&intruder, "home", &[], false).await;
    let Frame::Refused { reason, message } = answer else { panic!("{answer:?}") };
    assert_eq!(reason, RefusalReason::NameClaimed, "{message}");
    assert!(message.contains("cluster"), "{message}");

    // The same key at node 2 wins, and node 1 drops its tunnel at once (no lease to wait out).
    let second = connect(&node2, &hub).await;
    let (_c2, answer) = register(&second, "home", &[], false).await;
    assert!(matches!(answer, Frame::Registered { .. }), "{answer:?}");
    let closed = within("node 1 drops the replaced tunnel", first.closed()).await;
    assert_eq!(app_code(closed), Some(codes::REPLACED.into_inner()));
    assert!(second.close_reason().is_none());
    assert!(redis.command("GET kw:{home}:p").contains("node-2"));
    assert_eq!(node1.stats().hubs_connected(), 0);
    node1.shutdown().await;
    node2.shutdown().await;
}

#[tokio::test]
async fn an_app_at_a_node_without_the_hub_is_redirected_to_the_hubs_node() {
    let Some(redis) = RedisServer::start_if_available() else { return };
    let key = identity();
    let node1 = cluster_node(&key, "node-1", &redis).await;
    let node2 = cluster_node(&key, "node-2", &redis).await;
    let hub = identity();
    let app = identity();
    let hub_conn = connect(&node1, &hub).await;
    let (_control, answer) = register(&hub_conn, "home", &[app.public_key()], false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });

    let app_conn = connect(&node2, &app).await;
    let (_send, mut recv) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let answer = within("the answer at node 2", read_frame(&mut recv)).await.unwrap();
    assert_eq!(answer, Frame::Redirect { node: node1.local_addr() });
    // A name nobody holds is refused as at a single relay.
    let (_send, mut recv) =
        open_session(&app_conn, "nobody", hub.public_key(), SessionPurpose::Connect).await;
    let (reason, _) = refusal_of(&mut recv).await;
    assert!(matches!(reason, RefusalReason::UnknownHub | RefusalReason::HubOffline), "{reason:?}");
    let metrics = node2.stats().encode();
    assert!(metrics.contains("keyway_relay_cluster_redirects_total 1"), "{metrics}");
    node1.shutdown().await;
    node2.shutdown().await;
}

/// A node that does not hold the hub checks an app against the allow-list the hub's node
/// published before it redirects: a revoked or unknown app is refused there, a listed app or a
/// pairing is sent on. The list is published once the hub changes it (until then every app is
/// sent on, to be checked at the hub's node), at once, and in full again after the store lost
/// everything.
#[tokio::test]
async fn a_node_without_the_hub_refuses_apps_the_hubs_published_allow_list_does_not_admit() {
    let Some(redis) = RedisServer::start_if_available() else { return };
    let key = identity();
    let node1 = cluster_node(&key, "node-1", &redis).await;
    let node2 = cluster_node(&key, "node-2", &redis).await;
    let (hub, listed, stranger) = (identity(), identity(), identity());
    let hub_conn = connect(&node1, &hub).await;
    let (mut control, answer) = register(&hub_conn, "home", &[listed.public_key()], false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });
    let (listed_conn, stranger_conn) = (connect(&node2, &listed).await, connect(&node2, &stranger).await);
    let ask = |conn: Connection, purpose: SessionPurpose| {
        let hub_key = hub.public_key();
        async move {
            let (_send, mut recv) = open_session(&conn, "home", hub_key, purpose).await;
            within("the answer at node 2", read_frame(&mut recv)).await.unwrap()
        }
    };
    let redirect = Frame::Redirect { node: node1.local_addr() };
    // The list the hub registered with is not in the store (idle hubs cost it nothing).
    assert_eq!(ask(stranger_conn.clone(), SessionPurpose::Connect).await, redirect);
    assert_eq!(redis.command("EXISTS kw:{home}:a").lines().next(), Some(":0"));
    // The hub publishes a list (the same apps, e.g. a pairing window closing): now it is.
    let same = Frame::AllowList { allowed_apps: vec![listed.public_key()], pairing_open: false };
    write_frame(&mut control.send, &same).await.unwrap();
    eventually("the allow-list is in the store", || async {
        (redis.command("EXISTS kw:{home}:a").lines().next() == Some(":1")).then_some(())
    })
    .await;
    assert_eq!(ask(listed_conn.clone(), SessionPurpose::Connect).await, redirect);
    let answer = ask(stranger_conn.clone(), SessionPurpose::Connect).await;
    let Frame::Refused { reason, message } = answer else { panic!("{answer:?}") };
    assert_eq!(reason, RefusalReason::AppNotAuthorized, "{message}");
    assert!(message.contains(&stranger.public_key().fingerprint().to_string()), "{message}");
    // Pairing is for apps not yet listed: the hub's node decides it.
    assert_eq!(ask(stranger_conn.clone(), SessionPurpose::Pair).await, redirect);
    let metrics = node2.stats().encode();
    assert!(metrics.contains("keyway_relay_cluster_refused_total 1"), "{metrics}");
    assert!(metrics.contains("keyway_relay_refusals_total{reason=\"app_not_authorized\"} 1"), "{metrics}");

    // The hub revokes the listed app: node 2 refuses it once node 1 has published the list.
    let revoke = Frame::AllowList { allowed_apps: vec![stranger.public_key()], pairing_open: false };
    write_frame(&mut control.send, &revoke).await.unwrap();
    let revoked = std::time::Instant::now();
    eventually("node 2 refuses the revoked app", || async {
        let answer = ask(listed_conn.clone(), SessionPurpose::Connect).await;
        matches!(answer, Frame::Refused { reason: RefusalReason::AppNotAuthorized, .. }).then_some(())
    })
    .await;
    println!("revoked app refused at node 2 after {:?}", revoked.elapsed());
    assert_eq!(ask(stranger_conn.clone(), SessionPurpose::Connect).await, redirect, "the new list admits it");

    // The store forgets everything; the renewal re-asserts presence and the list in full.
    assert_eq!(redis.command("FLUSHALL").lines().next(), Some("+OK"));
    eventually("the allow-list is back in the store", || async {
        (redis.command("EXISTS kw:{home}:a").lines().next() == Some(":1")).then_some(())
    })
    .await;
    let answer = ask(listed_conn.clone(), SessionPurpose::Connect).await;
    assert!(matches!(answer, Frame::Refused { reason: RefusalReason::AppNotAuthorized, .. }), "{answer:?}");
    assert_eq!(ask(stranger_conn.clone(), SessionPurpose::Connect).await, redirect);

    // Revoking the last app leaves an empty list, which refuses every app (not "unknown").
    let none = Frame::AllowList { allowed_apps: vec![], pairing_open: false };
    write_frame(&mut control.send, &none).await.unwrap();
    eventually("node 2 refuses the last revoked app", || async {
        let answer = ask(stranger_conn.clone(), SessionPurpose::Connect).await;
        matches!(answer, Frame::Refused { reason: RefusalReason::AppNotAuthorized, .. }).then_some(())
    })
    .await;

    // When the hub goes, its list goes with its presence.
    hub_conn.close(0u32.into(), b"bye");
    eventually("the hub's keys are gone", || async {
        (redis.command("EXISTS kw:{home}:p kw:{home}:a").lines().next() == Some(":0")).then_some(())
    })
    .await;
    node1.shutdown().await;
    node2.shutdown().await;
}

/// A claim whose notice never arrived (pub/sub delivers at most once): the holder's next
/// renewal finds the higher epoch and drops the tunnel all the same.
#[tokio::test]
async fn a_lost_replacement_notice_is_made_up_for_by_the_next_renewal() {
    let Some(redis) = RedisServer::start_if_available() else { return };
    let key = identity();
    let node1 = cluster_node(&key, "node-1", &redis).await;
    let hub = identity();
    let conn = connect(&node1, &hub).await;
    let (_control, answer) = register(&conn, "home", &[], false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });
    let held = redis.command("GET kw:{home}:p");
    let epoch: u64 = held.lines().nth(1).and_then(|l| l.split(' ').next()).unwrap().parse().unwrap();
    // What another node's claim writes, without its PUBLISH.
    let newer = format!("{} node-2 127.0.0.1:9", epoch + 1);
    assert!(redis.command(&format!("SET kw:{{home}}:p \"{newer}\" PX 30000")).contains("OK"));
    let closed = within("the renewal drops the tunnel", conn.closed()).await;
    assert_eq!(app_code(closed), Some(codes::REPLACED.into_inner()));
    assert!(redis.command("GET kw:{home}:p").contains("node-2"), "the newer claim stands");
    node1.shutdown().await;
}

/// `/healthz` reports store trouble only once it lasts (`cluster::TROUBLE_GRACE`), and the
/// node keeps serving its hubs meanwhile; both recover when the store is back.
#[tokio::test]
async fn healthz_reports_lasting_store_trouble_and_the_node_keeps_its_hubs() {
    let Some(mut redis) = RedisServer::start_if_available() else { return };
    let key = identity();
    let node1 = cluster_node(&key, "node-1", &redis).await;
    let metrics = node1.metrics_addr().unwrap();
    let hub = identity();
    let conn = connect(&node1, &hub).await;
    let (mut control, _) = register(&conn, "home", &[], false).await;
    assert_eq!(keyway_test_support::http::get(metrics, "/healthz").await.0, 200);

    redis.kill();
    let (_, body) = eventually("healthz reports the store", || async {
        let (status, body) = keyway_test_support::http::get(metrics, "/healthz").await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert!(body.contains("cluster store"), "{body}");
    ping(&mut control, 7).await;
    assert!(conn.close_reason().is_none(), "the hub's tunnel is untouched");

    redis.restart();
    eventually("healthz is fine again", || async {
        (keyway_test_support::http::get(metrics, "/healthz").await.0 == 200).then_some(())
    })
    .await;
    node1.shutdown().await;
}

/// Redis Sentinel (`redis+sentinel://…`): the primary dies, the Sentinel promotes the replica,
/// and the nodes follow it: the hub registered before keeps its tunnel, a registration after the
/// failover lands in the new primary, and a node without that hub redirects to it.
#[tokio::test]
async fn after_a_sentinel_failover_the_nodes_use_the_new_primary() {
    let Some(mut primary) = RedisServer::start_if_available() else { return };
    let replica = RedisServer::start_replica_of(&primary);
    let sentinel = RedisSentinel::start(&primary, "kw");
    assert_eq!(sentinel.primary("kw"), Some(primary.addr()));
    let key = identity();
    let node1 = cluster_node_at(&key, "node-1", sentinel.url("kw")).await;
    let node2 = cluster_node_at(&key, "node-2", sentinel.url("kw")).await;
    let (before, after, app) = (identity(), identity(), identity());
    let (before_conn, _c1) = registered_hub(&node1, &before, "before", &[app.public_key()]).await;
    eventually("the presence reaches the replica", || async {
        replica.command("GET kw:{before}:p").contains("node-1").then_some(())
    })
    .await;

    primary.kill();
    eventually("the sentinel promotes the replica", || async {
        (sentinel.primary("kw") == Some(replica.addr())).then_some(())
    })
    .await;
    let (_after_conn, _c2) = registered_hub(&node2, &after, "after", &[app.public_key()]).await;
    eventually("the new registration is in the new primary", || async {
        replica.command("GET kw:{after}:p").contains("node-2").then_some(())
    })
    .await;
    let app_conn = connect(&node1, &app).await;
    let redirect = Frame::Redirect { node: node2.local_addr() };
    eventually("node 1 redirects through the new primary", || async {
        let (_send, mut recv) =
            open_session(&app_conn, "after", after.public_key(), SessionPurpose::Connect).await;
        (within("the answer", read_frame(&mut recv)).await.ok() == Some(redirect.clone())).then_some(())
    })
    .await;
    assert!(before_conn.close_reason().is_none(), "the hub registered before the failover kept its tunnel");
    assert_eq!(node1.stats().hubs_connected(), 1);
    node1.shutdown().await;
    node2.shutdown().await;
}
