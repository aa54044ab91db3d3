//! The cluster store on Redis (or anything speaking its protocol: Valkey, KeyDB).
//!
//! Every multi-step rule runs as one Lua script, so it is atomic on the server: the claim
//! (always wins, epoch above any the name had, publishes the notice), the renewal
//! (compare-and-set on the epoch, re-asserting a lost lease), the release (only its own
//! epoch), the allow-list a hub's node publishes (only under the holder's epoch) and the
//! open-policy binding (first key wins). The keys of one hub share the hash tag `{NAME}`
//! (`kw:{home}:p` presence, `kw:{home}:a` allow-list, `kw:{home}:b` binding), so under Redis
//! Cluster every
//! script touches a single slot; node keys are `kw:node:{ID}`, the state marker `kw:state`,
//! and the notices go out on the channel `kw:replaced` (Cluster broadcasts pub/sub to every
//! node). One presence is one string key with a TTL (`EPOCH NODE ADDR`), about 100 bytes of
//! Redis memory per hub.
//!
//! The connection is a [`redis::aio::ConnectionManager`] (multiplexed, reconnects by itself)
//! with short timeouts: a node must notice store trouble in about a second, not hang its
//! registrations on it. The notices come over a separate pub/sub connection that a task keeps
//! re-subscribing.
//!
//! **Sentinel**: with `redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER` the primary is asked of
//! the Sentinels (the redis crate's `SentinelClient`): at start, and again after any failed
//! operation (a dead primary refuses connections, a demoted one answers writes `READONLY`), so a
//! failover costs the node the operations of the few seconds it takes, which are retried as after
//! any store trouble. What the new primary had not replicated yet is re-asserted by the
//! renewals (presence, allow-lists) and from the bindings files, as after a restart.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use keyway_proto::{HubName, PublicKey};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::Script;
use tokio::sync::broadcast;
use tracing::{debug, warn};

use super::records::{AppList, NodeId, Presence, Renewal, Replaced, StoreError};

/// Longest a store operation may take before it counts as store trouble.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// The pub/sub channel of replacement notices.
const NOTICES: &str = "kw:replaced";
/// A key that exists while the store keeps what nodes wrote to it (see `heartbeat`).
const MARKER: &str = "kw:state";

/// Always wins; the epoch is the server's clock in µs, or one above the epoch the name had.
/// KEYS[1] presence, KEYS[2] allow-list; ARGV: node, addr, lease ms, notice channel, name,
/// allow-list (empty: none, the key is removed). `%.0f`: Lua numbers are
/// doubles, and tostring would print a µs clock as 1.7e+15 (exact below 2^53: until 2255).
const CLAIM: &str = r"
local t = redis.call('TIME')
local epoch = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = redis.call('GET', KEYS[1])
if cur then
  local e = tonumber(string.match(cur, '^(%d+) '))
  if e and e >= epoch then epoch = e + 1 end
end
local text = string.format('%.0f', epoch)
redis.call('SET', KEYS[1], text .. ' ' .. ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[3])
if ARGV[6] == '' then redis.call('DEL', KEYS[2]) else redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[3]) end
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. text .. ' ' .. ARGV[1])
return text
";

/// Keeps or re-asserts a lease unless a higher epoch holds the name, and the allow-list's
/// lease with it. KEYS[1] presence, KEYS[2] allow-list; ARGV: epoch, the full record, lease ms,
/// '1' if the holder has a non-empty allow-list. Returns 1 (held), 2 (held, but the store had
/// lost the record or the list: publish the list again) or 0 (lost to a higher epoch).
const RENEW: &str = r"
local cur = redis.call('GET', KEYS[1])
local same = false
if cur then
  local e = tonumber(string.match(cur, '^(%d+) '))
  if e and e > tonumber(ARGV[1]) then return 0 end
  same = e == tonumber(ARGV[1])
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if ARGV[4] == '1' and redis.call('PEXPIRE', KEYS[2], ARGV[3]) == 0 then return 2 end
if not same then return 2 end
return 1
";

/// Publishes the holder's allow-list, only while it holds the name with this epoch (an older
/// holder's late write must not overwrite the newer one's). KEYS[1] presence, KEYS[2]
/// allow-list; ARGV: epoch, list, lease ms. Returns 1 (written) or 0.
const APPS: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur or string.match(cur, '^(%d+) ') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Deletes the presence and allow-list only if the name still has this epoch. KEYS[1]
/// presence, KEYS[2] allow-list; ARGV[1] epoch.
const RELEASE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^(%d+) ') == ARGV[1] then redis.call('DEL', KEYS[1], KEYS[2]) end
return 1
";

/// First key wins. KEYS[1] binding; ARGV[1] key. Returns the bound key.
const BIND: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
";

fn presence_key(name: &HubName) -> String {
    format!("kw:{{{name}}}:p")
}

fn apps_key(name: &HubName) -> String {
    format!("kw:{{{name}}}:a")
}

fn binding_key(name: &HubName) -> String {
    format!("kw:{{{name}}}:b")
}

/// Whether the store keeps what it is told across its own restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `appendonly yes`.
    AppendOnly,
    /// `appendonly no`: a restart keeps at most the last RDB snapshot.
    NotAppendOnly,
    /// `CONFIG GET` is not allowed (managed services): the operator must know.
    Unknown,
}

struct Scripts {
    claim: Script,
    renew: Script,
    release: Script,
    apps: Script,
    bind: Script,
}

/// Where the primary is: one address, or whatever the Sentinels name.
#[derive(Clone)]
enum Source {
    Direct(redis::Client),
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

impl Source {
    /// `redis://…` (anything [`redis::Client::open`] takes) or
    /// `redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER`.
    fn parse(url: &str) -> Result<Self, StoreError> {
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            return Ok(Self::Direct(redis::Client::open(url)?));
        };
        let bad = |why| StoreError::Address { url: url.to_owned(), why };
        let (hosts, master) = rest.split_once('/').ok_or(bad("it names no master after the hosts"))?;
        if master.is_empty() || master.contains('/') {
            return Err(bad("the master name after the hosts must be one non-empty path segment"));
        }
        let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
        if hosts.is_empty() || sentinels.iter().any(|h| h.len() == "redis://".len()) {
            return Err(bad("it names no Sentinel host"));
        }
        let client = SentinelClient::build(sentinels, master.to_owned(), None, SentinelServerType::Master)?;
        Ok(Self::Sentinel(Arc::new(tokio::sync::Mutex::new(client))))
    }

    /// A client of the primary now.
    async fn client(&self) -> Result<redis::Client, StoreError> {
        match self {
            Self::Direct(client) => Ok(client.clone()),
            Self::Sentinel(sentinel) => {
                bounded(async { sentinel.lock().await.async_get_client().await }).await
            }
        }
    }
}

async fn manager(client: &redis::Client) -> Result<ConnectionManager, StoreError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(STORE_TIMEOUT))
        .set_response_timeout(Some(STORE_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    bounded(client.get_connection_manager_with_config(config)).await
}

/// The Redis store: a multiplexed connection and the notices task.
#[derive(Clone)]
pub struct RedisStore {
    url: String,
    source: Arc<Source>,
    /// The connection to the primary; replaced when the Sentinels name another one.
    conn: Arc<RwLock<ConnectionManager>>,
    /// Held while the primary is asked of the Sentinels (one asking at a time).
    asking: Arc<tokio::sync::Mutex<()>>,
    scripts: Arc<Scripts>,
    notices: broadcast::Sender<Replaced>,
    _subscriber: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
    match tokio::time::timeout(STORE_TIMEOUT, f).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Timeout(STORE_TIMEOUT)),
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://HOST:PORT[/DB]`, `rediss://` is not built in). Fails if
    /// the store is unreachable now: a node must not start believing it is in a cluster it
    /// cannot see. Trouble after the start is survived (see the cluster module).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let source = Arc::new(Source::parse(url)?);
        let conn = manager(&source.client().await?).await?;
        let (notices, _) = broadcast::channel(4096);
        let (subscribed, first) = tokio::sync::oneshot::channel();
        let subscriber = tokio::spawn(subscribe(Arc::clone(&source), notices.clone(), subscribed));
        // Listening before the node takes hubs, so that the first replacement is heard (a
        // subscription that takes longer is made up for by the renewals).
        let _ = tokio::time::timeout(STORE_TIMEOUT, first).await;
        Ok(Self {
            url: url.to_owned(),
            source,
            conn: Arc::new(RwLock::new(conn)),
            asking: Arc::default(),
            scripts: Arc::new(Scripts {
                claim: Script::new(CLAIM),
                renew: Script::new(RENEW),
                release: Script::new(RELEASE),
                apps: Script::new(APPS),
                bind: Script::new(BIND),
            }),
            notices,
            _subscriber: Arc::new(AbortOnDrop(subscriber)),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection to the primary as it is now.
    fn conn(&self) -> ConnectionManager {
        self.conn.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Runs one operation on the primary. Under Sentinel a failure (the primary died, or was
    /// demoted and refuses writes) has the primary asked of the Sentinels again, in the
    /// background, for the operations after it.
    async fn run<T, F>(&self, op: impl FnOnce(ConnectionManager) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = bounded(op(self.conn())).await;
        if result.is_err() {
            if let Source::Sentinel(_) = &*self.source {
                let store = self.clone();
                tokio::spawn(async move { store.ask_sentinels().await });
            }
        }
        result
    }

    async fn ask_sentinels(&self) {
        let Ok(_asking) = self.asking.try_lock() else { return };
        match self.source.client().await {
            Ok(client) => match manager(&client).await {
                Ok(conn) => {
                    debug!(primary = ?client.get_connection_info().addr(), "cluster store primary (from the Sentinels)");
                    *self.conn.write().unwrap_or_else(PoisonError::into_inner) = conn;
                }
                Err(e) => debug!("cannot connect to the primary the Sentinels name: {e}"),
            },
            Err(e) => debug!("cannot ask the Sentinels for the primary: {e}"),
        }
    }

    /// Reads `appendonly` (see [`Durability`]).
    pub async fn durability(&self) -> Durability {
        let reply: Result<Vec<String>, _> = self
            .run(|mut conn| async move {
                redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(&mut conn).await
            })
            .await;
        match reply.as_deref() {
            Ok([_, value]) if value == "yes" => Durability::AppendOnly,
            Ok([_, _]) => Durability::NotAppendOnly,
            _ => Durability::Unknown,
        }
    }

    pub(super) async fn claim(
        &self,
        name: &HubName,
        node: &NodeId,
        addr: SocketAddr,
        lease: Duration,
        apps: &AppList,
    ) -> Result<u64, StoreError> {
        let mut call = self.scripts.claim.key(presence_key(name));
        call.key(apps_key(name));
        call.arg(node.as_str()).arg(addr.to_string()).arg(lease_ms(lease)).arg(NOTICES).arg(name.as_str());
        // Empty: no list is stored, and an older holder's is removed (see `AppList`).
        call.arg(if apps.is_empty() { Vec::new() } else { apps.to_bytes() });
        let epoch: String = self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        epoch.parse().map_err(|_| StoreError::Garbled(format!("epoch {epoch:?}")))
    }

    pub(super) async fn renew(
        &self,
        name: &HubName,
        presence: &Presence,
        lease: Duration,
        listed: bool,
    ) -> Result<Renewal, StoreError> {
        let mut call = self.scripts.renew.key(presence_key(name));
        call.key(apps_key(name));
        call.arg(presence.epoch.to_string()).arg(presence.encode()).arg(lease_ms(lease));
        call.arg(if listed { "1" } else { "0" });
        let held: i64 = self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(match held {
            1 => Renewal::Held,
            2 => Renewal::Restored,
            _ => Renewal::Lost,
        })
    }

    pub(super) async fn publish_apps(
        &self,
        name: &HubName,
        epoch: u64,
        apps: &AppList,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut call = self.scripts.apps.key(presence_key(name));
        call.key(apps_key(name));
        call.arg(epoch.to_string()).arg(apps.to_bytes()).arg(lease_ms(lease));
        let written: i64 = self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(written == 1)
    }

    pub(super) async fn release(&self, name: &HubName, epoch: u64) -> Result<(), StoreError> {
        let mut call = self.scripts.release.key(presence_key(name));
        call.key(apps_key(name));
        call.arg(epoch.to_string());
        let _: i64 = self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        Ok(())
    }

    pub(super) async fn lookup(
        &self,
        name: &HubName,
    ) -> Result<Option<(Presence, Option<AppList>)>, StoreError> {
        // One slot (the hash tag), so one MGET reads both under Redis Cluster too.
        let mut mget = redis::cmd("MGET");
        mget.arg(presence_key(name)).arg(apps_key(name));
        let (text, apps): (Option<String>, Option<Vec<u8>>) =
            self.run(|mut conn| async move { mget.query_async(&mut conn).await }).await?;
        let Some(text) = text else { return Ok(None) };
        let presence = Presence::decode(&text).ok_or(StoreError::Garbled(text))?;
        let apps = match apps {
            None => None,
            Some(bytes) => Some(
                AppList::from_bytes(&bytes)
                    .ok_or_else(|| StoreError::Garbled(format!("allow-list of {} bytes", bytes.len())))?,
            ),
        };
        Ok(Some((presence, apps)))
    }

    pub(super) async fn bind(&self, name: &HubName, key: &PublicKey) -> Result<PublicKey, StoreError> {
        let mut call = self.scripts.bind.key(binding_key(name));
        call.arg(key.to_string());
        let bound: String = self.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await?;
        bound.parse().map_err(|_| StoreError::Garbled(format!("binding {bound:?}")))
    }

    pub(super) async fn heartbeat(
        &self,
        node: &NodeId,
        addr: SocketAddr,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(MARKER).arg("1").arg("NX");
        pipe.cmd("SET")
            .arg(format!("kw:node:{{{node}}}"))
            .arg(addr.to_string())
            .arg("PX")
            .arg(lease_ms(lease));
        let (set, _): (Option<String>, Option<String>) =
            self.run(|mut conn| async move { pipe.query_async(&mut conn).await }).await?;
        Ok(set.is_some())
    }

    pub(super) fn notices(&self) -> broadcast::Receiver<Replaced> {
        self.notices.subscribe()
    }
}

fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Keeps a subscription to the notices channel, re-subscribing after any trouble.
async fn subscribe(
    source: Arc<Source>,
    notices: broadcast::Sender<Replaced>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) {
    let mut subscribed = Some(subscribed);
    loop {
        let client = match source.client().await {
            Ok(client) => client,
            Err(e) => {
                debug!("cannot find the cluster store for notices: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(NOTICES).await {
                Ok(()) => {
                    debug!("subscribed to cluster notices");
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let Ok(text) = message.get_payload::<String>() else { continue };
                        match Replaced::decode(&text) {
                            Some(notice) => {
                                let _ = notices.send(notice);
                            }
                            None => warn!(notice = %text, "unreadable cluster notice ignored"),
                        }
                    }
                    debug!("cluster notice subscription ended; re-subscribing");
                }
                Err(e) => debug!("cannot subscribe to cluster notices: {e}"),
            },
            Err(e) => debug!("cannot open the cluster notice connection: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_addresses_are_read_or_refused_with_a_reason() {
        assert!(matches!(Source::parse("redis://127.0.0.1:6379"), Ok(Source::Direct(_))));
        let one = Source::parse("redis+sentinel://10.0.0.1:26379/kw");
        assert!(matches!(one, Ok(Source::Sentinel(_))));
        let three = Source::parse("redis+sentinel://a:26379,b:26379,c:26379/kw");
        assert!(matches!(three, Ok(Source::Sentinel(_))));
        for bad in [
            "redis+sentinel://",
            "redis+sentinel://a:1",
            "redis+sentinel://a:1/",
            "redis+sentinel:///kw",
            "redis+sentinel://a:1,/kw",
            "redis+sentinel://a:1/kw/x",
        ] {
            match Source::parse(bad) {
                Err(e @ StoreError::Address { .. }) => {
                    assert!(e.to_string().contains("redis+sentinel://HOST"), "{e}")
                }
                Err(e) => panic!("{bad}: {e}"),
                Ok(_) => panic!("{bad} accepted"),
            }
        }
    }
}
