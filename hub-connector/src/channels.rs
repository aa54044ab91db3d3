//! The channels the relay introduced on one tunnel, by the virtual address the
//! path socket gave each: who the app is (the key the relay authenticated and announced), why
//! it came (connect or pair), where the relay saw it, and a signal that fires when the channel
//! ends.
//!
//! Plain state shared by the announce handler ([`crate::channel`], which adds a channel and
//! removes it when the relay's stream ends) and the end-to-end accept loop ([`crate::e2e`],
//! which looks up who is dialing from a virtual address). The binding itself (what keeps the
//! packets flowing) stays with the announce handler, so a channel's packets stop the moment
//! the handler lets go of it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use keyway_proto::{PublicKey, SessionPurpose};
use tokio::sync::watch;

/// One announced channel.
#[derive(Debug)]
pub(crate) struct ChannelInfo {
    pub(crate) app_key: PublicKey,
    /// The app's address as the relay saw it (for logs and the PROXY header).
    pub(crate) observed: SocketAddr,
    pub(crate) purpose: SessionPurpose,
    ended: watch::Sender<bool>,
}

impl ChannelInfo {
    /// Resolves once the channel has ended (the relay's stream ended or the tunnel went away).
    pub(crate) async fn ended(&self) {
        let mut rx = self.ended.subscribe();
        // `wait_for` checks the current value first, so an end before the call is not missed.
        let _ = rx.wait_for(|ended| *ended).await;
    }
}

/// The live channels of one tunnel.
#[derive(Debug, Default)]
pub(crate) struct Channels {
    by_addr: Mutex<HashMap<SocketAddr, Arc<ChannelInfo>>>,
}

/// Membership of one channel in [`Channels`]; ends the channel on drop.
#[derive(Debug)]
pub(crate) struct ChannelEntry {
    channels: Arc<Channels>,
    addr: SocketAddr,
    info: Arc<ChannelInfo>,
}

impl Drop for ChannelEntry {
    fn drop(&mut self) {
        self.channels.lock().remove(&self.addr);
        self.info.ended.send_replace(true);
    }
}

impl Channels {
    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Arc<ChannelInfo>>> {
        self.by_addr.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the channel bound to virtual address `addr`.
    pub(crate) fn add(
        self: &Arc<Self>,
        addr: SocketAddr,
        app_key: PublicKey,
        observed: SocketAddr,
        purpose: SessionPurpose,
    ) -> ChannelEntry {
        let info = Arc::new(ChannelInfo { app_key, observed, purpose, ended: watch::channel(false).0 });
        self.lock().insert(addr, info.clone());
        ChannelEntry { channels: self.clone(), addr, info }
    }

    /// The channel bound to `addr`, if it is still live.
    pub(crate) fn get(&self, addr: &SocketAddr) -> Option<Arc<ChannelInfo>> {
        self.lock().get(addr).cloned()
    }

    /// How many channels are live.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;

    #[tokio::test]
    async fn a_dropped_entry_is_gone_and_its_end_is_seen_even_by_late_waiters() {
        let channels = Arc::new(Channels::default());
        let addr: SocketAddr = "240.0.0.1:1".parse().unwrap();
        let app = Identity::from_seed([1; 32]).public_key();
        let entry = channels.add(addr, app, "192.0.2.1:5".parse().unwrap(), SessionPurpose::Connect);
        let info = channels.get(&addr).unwrap();
        assert_eq!(info.app_key, app);
        assert_eq!(channels.len(), 1);
        drop(entry);
        assert!(channels.get(&addr).is_none());
        assert_eq!(channels.len(), 0);
        info.ended().await; // would hang if the end were lost
    }
}
