//! [`TunnelStatus`]: where the tunnel to one relay stands, and how the hub's overall status
//! follows from its tunnels' ([`TunnelStatus::aggregate`], pure and tested here).

use std::fmt;

use keyway_proto::RefusalReason;

/// Where the tunnel stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelStatus {
    /// Dialing or registering (also after losing the tunnel, while backing off).
    Connecting,
    /// Registered: sessions can reach the hub.
    Registered,
    /// The relay refused the registration; the connector keeps retrying with backoff.
    Refused { reason: RefusalReason, message: String },
    /// The connector was shut down.
    Stopped,
}

impl fmt::Display for TunnelStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelStatus::Connecting => f.write_str("connecting"),
            TunnelStatus::Registered => f.write_str("registered"),
            TunnelStatus::Refused { reason, message } => write!(f, "refused ({reason}): {message}"),
            TunnelStatus::Stopped => f.write_str("stopped"),
        }
    }
}

impl TunnelStatus {
    /// The status of the hub as a whole, from those of its tunnels (in config order): registered
    /// if any tunnel is; else refused if any relay refused (the first such refusal); stopped once
    /// every tunnel has stopped; connecting otherwise.
    pub(crate) fn aggregate<'a>(statuses: impl IntoIterator<Item = &'a TunnelStatus>) -> TunnelStatus {
        let mut refused = None;
        let mut all_stopped = true;
        for status in statuses {
            match status {
                TunnelStatus::Registered => return TunnelStatus::Registered,
                TunnelStatus::Refused { .. } if refused.is_none() => refused = Some(status.clone()),
                _ => {}
            }
            all_stopped &= *status == TunnelStatus::Stopped;
        }
        match refused {
            Some(refused) => refused,
            None if all_stopped => TunnelStatus::Stopped,
            None => TunnelStatus::Connecting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_is_registered_while_any_tunnel_is() {
        use TunnelStatus::*;
        let refused = Refused { reason: RefusalReason::NameClaimed, message: "taken".into() };
        assert_eq!(TunnelStatus::aggregate(&[Connecting, Registered]), Registered);
        assert_eq!(TunnelStatus::aggregate(&[refused.clone(), Registered]), Registered);
        assert_eq!(TunnelStatus::aggregate(&[Stopped, Registered]), Registered);
        assert_eq!(TunnelStatus::aggregate(&[Connecting, refused.clone()]), refused);
        assert_eq!(TunnelStatus::aggregate(&[Connecting, Stopped]), Connecting);
        assert_eq!(TunnelStatus::aggregate(&[Stopped, Stopped]), Stopped);
        assert_eq!(TunnelStatus::aggregate(&[Connecting]), Connecting);
        assert_eq!(TunnelStatus::aggregate(std::slice::from_ref(&refused)), refused);
    }
}
