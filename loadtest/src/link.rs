//! A link with delay and loss, in user space: what these kernels' missing `netem` would do for a
//! benchmark. A UDP forwarder in front of one server address: each client address that sends
//! to it gets an upstream socket of its own (so the server sees one source per client, as
//! through a NAT), and every datagram waits its one-way delay (plus jitter, which reorders) and
//! may be dropped (random loss, or bursts of it), each direction alike, under an optional rate
//! cap that queues (a bottleneck's buffer, bounded) and drops what does not fit.
//!
//! Each direction is a pair of tasks: one receives and stamps each datagram with the moment it
//! may leave, one sends them when due. Constant delay keeps order, so the queue is a FIFO; with
//! jitter a heap orders departures. Timers are tokio's (1 ms granularity): fine for the tens of
//! milliseconds benchmarks ask for, not for microsecond delays.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// What the link does to every datagram, per direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkParams {
    /// One-way delay (half the round trip the link adds).
    pub delay: Duration,
    /// Each datagram's delay is `delay` plus a uniform draw in `0..jitter` (reorders).
    pub jitter: Duration,
    /// Probability that a datagram is dropped (0.0 to 1.0).
    pub loss: f64,
    /// Mean length of a loss burst, in datagrams (1: independent losses).
    pub burst: f64,
    /// Bits per second each direction carries at most (0: no cap). Datagrams beyond it wait
    /// in a queue of `queue_bytes`, and are dropped when that is full.
    pub rate_bps: u64,
    /// Bytes the rate cap's queue holds.
    pub queue_bytes: usize,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: 1.0,
            rate_bps: 0,
            queue_bytes: 4 << 20,
        }
    }
}

impl LinkParams {
    /// A link adding `rtt` of round trip and dropping `loss` of the datagrams each way.
    pub fn rtt_loss(rtt: Duration, loss: f64) -> Self {
        Self { delay: rtt / 2, loss, ..Self::default() }
    }
}

/// What the link did, in datagrams, both directions together.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    pub overflowed: AtomicU64,
}

/// A running link; stops (all its tasks) when dropped.
pub struct Link {
    addr: SocketAddr,
    counters: Arc<LinkCounters>,
    stop: Arc<Notify>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.notify_waiters();
    }
}

impl Link {
    /// Starts a link on a fresh loopback port in front of `server`.
    pub async fn start(server: SocketAddr, params: LinkParams) -> anyhow::Result<Link> {
        anyhow::ensure!((0.0..=1.0).contains(&params.loss), "loss {} is not a probability", params.loss);
        anyhow::ensure!(params.burst >= 1.0, "a loss burst is at least one datagram");
        let front = Arc::new(bound(SocketAddr::from(([127, 0, 0, 1], 0))).await?);
        let addr = front.local_addr()?;
        let counters = Arc::new(LinkCounters::default());
        let stop = Arc::new(Notify::new());
        let link = Link { addr, counters: counters.clone(), stop: stop.clone() };
        // Client → server: one delay line for all clients; each datagram leaves from its
        // client's upstream socket.
        let (to_server, mut upstream_queue) = delay_line(params, counters.clone(), stop.clone());
        let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        let (to_client, mut downstream_queue) = delay_line(params, counters.clone(), stop.clone());
        {
            let (front, stop) = (front.clone(), stop.clone());
            let upstreams = upstreams.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let received = tokio::select! {
                        r = front.recv_from(&mut buf) => r,
                        () = stop.notified() => return,
                    };
                    let Ok((n, client)) = received else { continue };
                    let Some(datagram) = buf.get(..n) else { continue };
                    let existing =
                        upstreams.lock().unwrap_or_else(PoisonError::into_inner).get(&client).cloned();
                    let upstream = match existing {
                        Some(upstream) => upstream,
                        None => {
                            let Ok(socket) = bound(SocketAddr::from(([127, 0, 0, 1], 0))).await else {
                                continue;
                            };
                            let socket = Arc::new(socket);
                            upstreams
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(client, socket.clone());
                            // Server → this client.
                            let (socket_rx, to_client, stop) =
                                (socket.clone(), to_client.clone(), stop.clone());
                            tokio::spawn(async move {
                                let mut buf = vec![0u8; 65536];
                                loop {
                                    let received = tokio::select! {
                                        r = socket_rx.recv_from(&mut buf) => r,
                                        () = stop.notified() => return,
                                    };
                                    let Ok((n, _)) = received else { continue };
                                    let Some(datagram) = buf.get(..n) else { continue };
                                    to_client.push(datagram, Target::Front(client));
                                }
                            });
                            socket
                        }
                    };
                    to_server.push(datagram, Target::Upstream(upstream, server));
                }
            });
        }
        tokio::spawn(async move { upstream_queue.run().await });
        {
            let front = front.clone();
            tokio::spawn(async move { downstream_queue.run_to(&front).await });
        }
        Ok(link)
    }

    /// Where clients send to reach the server through the link.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the link did so far.
    pub fn counters(&self) -> &LinkCounters {
        &self.counters
    }
}

/// Where a delayed datagram goes.
#[derive(Clone)]
enum Target {
    /// To the server, from this client's upstream socket.
    Upstream(Arc<UdpSocket>, SocketAddr),
    /// To this client, from the link's front socket.
    Front(SocketAddr),
}

/// A datagram waiting for its moment.
struct Due {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
    target: Target,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The receiving half of one direction: decides loss and departure time.
#[derive(Clone)]
struct LineInput {
    state: Arc<Mutex<LineState>>,
    tx: mpsc::UnboundedSender<Due>,
    counters: Arc<LinkCounters>,
}

struct LineState {
    params: LinkParams,
    rng: rand::rngs::StdRng,
    /// Inside a loss burst.
    losing: bool,
    /// When the rate cap's queue drains (the last byte queued leaves).
    busy_until: Instant,
    seq: u64,
}

impl LineInput {
    fn push(&self, data: &[u8], target: Target) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if s.lose() {
            self.counters.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut depart = now;
        if s.params.rate_bps > 0 {
            let start = s.busy_until.max(now);
            let backlog = start.saturating_duration_since(now).as_secs_f64() * s.params.rate_bps as f64 / 8.0;
            if backlog + data.len() as f64 > s.params.queue_bytes as f64 {
                self.counters.overflowed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let serialise = Duration::from_secs_f64(data.len() as f64 * 8.0 / s.params.rate_bps as f64);
            s.busy_until = start + serialise;
            depart = s.busy_until;
        }
        let jitter = s.params.jitter;
        let extra = if jitter.is_zero() { Duration::ZERO } else { jitter.mul_f64(s.rng.random::<f64>()) };
        s.seq += 1;
        let due = Due { at: depart + s.params.delay + extra, seq: s.seq, data: data.to_vec(), target };
        let _ = self.tx.send(due);
    }
}

impl LineState {
    /// Gilbert-style loss: enter a burst with a probability that keeps the mean loss rate at
    /// `loss`, stay in it with mean length `burst`.
    fn lose(&mut self) -> bool {
        let (loss, burst) = (self.params.loss, self.params.burst);
        if loss <= 0.0 {
            return false;
        }
        let stay = 1.0 - 1.0 / burst;
        let enter = (loss / burst / (1.0 - loss)).min(1.0);
        self.losing =
            if self.losing { self.rng.random::<f64>() < stay } else { self.rng.random::<f64>() < enter };
        self.losing
    }
}

/// The sending half of one direction.
struct LineOutput {
    rx: mpsc::UnboundedReceiver<Due>,
    counters: Arc<LinkCounters>,
    stop: Arc<Notify>,
}

fn delay_line(params: LinkParams, counters: Arc<LinkCounters>, stop: Arc<Notify>) -> (LineInput, LineOutput) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = LineState {
        params,
        rng: rand::rngs::StdRng::from_os_rng(),
        losing: false,
        busy_until: Instant::now(),
        seq: 0,
    };
    let input = LineInput { state: Arc::new(Mutex::new(state)), tx, counters: counters.clone() };
    (input, LineOutput { rx, counters, stop })
}

impl LineOutput {
    /// Sends each datagram when due to its upstream target.
    async fn run(&mut self) {
        self.run_with(None).await;
    }

    /// Sends each datagram when due; `Front` targets leave from `front`.
    async fn run_to(&mut self, front: &UdpSocket) {
        self.run_with(Some(front)).await;
    }

    async fn run_with(&mut self, front: Option<&UdpSocket>) {
        let mut waiting: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
        loop {
            let next = waiting.peek().map(|Reverse(d)| d.at);
            tokio::select! {
                received = self.rx.recv() => match received {
                    Some(due) => waiting.push(Reverse(due)),
                    None => return,
                },
                () = sleep_until(next) => {
                    let now = Instant::now();
                    while waiting.peek().is_some_and(|Reverse(d)| d.at <= now) {
                        let Some(Reverse(due)) = waiting.pop() else { break };
                        let sent = match (&due.target, front) {
                            (Target::Upstream(socket, server), _) => socket.send_to(&due.data, server).await,
                            (Target::Front(client), Some(front)) => front.send_to(&due.data, client).await,
                            (Target::Front(_), None) => continue,
                        };
                        if sent.is_ok() {
                            self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                () = self.stop.notified() => return,
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A loopback UDP socket with 4 MiB buffers, as the endpoints it sits between.
async fn bound(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket.into())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server and a client through a link; returns (client socket, link).
    async fn bed(params: LinkParams) -> (UdpSocket, Link) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let _ = server.send_to(&buf[..n], from).await;
            }
        });
        let link = Link::start(server_addr, params).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(link.addr()).await.unwrap();
        (client, link)
    }

    #[tokio::test]
    async fn a_round_trip_takes_at_least_the_delay_and_order_is_kept() {
        let (client, _link) = bed(LinkParams::rtt_loss(Duration::from_millis(40), 0.0)).await;
        let start = Instant::now();
        for i in 0..50u8 {
            client.send(&[i; 100]).await.unwrap();
        }
        let mut buf = [0u8; 200];
        for i in 0..50u8 {
            let n =
                tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf)).await.unwrap().unwrap();
            assert_eq!((n, buf[0]), (100, i), "in order");
        }
        let took = start.elapsed();
        // Generous upper bound: the machine may be busy; the lower bound is the point.
        assert!(took >= Duration::from_millis(40), "echoed in {took:?}, under the 40 ms round trip");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn loss_drops_about_the_asked_share_each_way() {
        let (client, link) = bed(LinkParams::rtt_loss(Duration::ZERO, 0.1)).await;
        let client = Arc::new(client);
        // Read while sending: a socket's default buffer holds only a few hundred datagrams.
        let reader = {
            let client = client.clone();
            tokio::spawn(async move {
                let mut back = 0u32;
                let mut buf = [0u8; 128];
                while let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(500), client.recv(&mut buf)).await
                {
                    back += 1;
                }
                back
            })
        };
        let sent = 4000u32;
        for _ in 0..sent {
            client.send(&[7; 64]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let back = reader.await.unwrap();
        // Two passes at 10 %: 81 % come back; the bounds are ±5 points of the expectation.
        let share = f64::from(back) / f64::from(sent);
        assert!((0.76..=0.86).contains(&share), "{back} of {sent} came back ({share:.3})");
        let lost = link.counters().lost.load(Ordering::Relaxed);
        // What did not come back was lost in the link, one way or the other (nothing else
        // drops at this rate on loopback).
        assert_eq!(lost, u64::from(sent - back), "lost {lost}, back {back} of {sent}");
    }

    #[tokio::test]
    async fn jitter_reorders_and_the_rate_cap_drops_what_its_queue_cannot_hold() {
        let params = LinkParams { jitter: Duration::from_millis(20), ..LinkParams::default() };
        let (client, _link) = bed(params).await;
        for i in 0..200u8 {
            client.send(&[i; 10]).await.unwrap();
        }
        let mut order = Vec::new();
        let mut buf = [0u8; 64];
        while order.len() < 200 {
            tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf)).await.unwrap().unwrap();
            order.push(buf[0]);
        }
        assert!(order.windows(2).any(|w| w[0] > w[1]), "jitter reordered nothing");

        // 1 Mbit/s with a 10 KB queue: a burst of 100 KB cannot all pass.
        let params = LinkParams { rate_bps: 1_000_000, queue_bytes: 10_000, ..LinkParams::default() };
        let (client, link) = bed(params).await;
        for _ in 0..100 {
            client.send(&[1; 1000]).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(link.counters().overflowed.load(Ordering::Relaxed) > 50, "the queue bound held nothing back");
    }
}
