//! QUIC application error codes: the one list of every code Keyway puts in a connection close
//! (`CONNECTION_CLOSE`), a stream reset (`RESET_STREAM`) or a stop request (`STOP_SENDING`).
//!
//! They live here, beside the frames, because both ends read them: the relay, the hub
//! connector and the client library all send and match these values, and a code defined in one
//! crate and guessed in another is how the two copies of this list once came to disagree.
//! `docs/protocol.md` has the same table; the codes are stable on the wire.

use quinn::VarInt;

/// 0 — normal end, nothing went wrong.
///
/// Sent by everyone: an app closing its relay connection (`keyway_client::Client::close`), a
/// hub connector stopping or giving up on a tunnel, and any side resetting or stopping a session
/// stream because the session simply ended or its peer went away (a timed-out announce at the
/// relay, a PROXY header the local service would not take at the hub).
pub const NORMAL: VarInt = VarInt::from_u32(0);

/// 1 — a newer connection registered the same hub name with the same key.
///
/// Sent by the relay, as a connection close, to the *older* hub connection when a new one
/// takes its place. The hub connector reads it to tell "replaced" from "lost": it warns that a
/// second connector may run with its key and keeps backing off instead of fighting over the name.
pub const REPLACED: VarInt = VarInt::from_u32(1);

/// 2 — the relay is going away (restart, shutdown, end of its drain).
///
/// Sent by the relay, as a connection close, to every connection when it stops. Hubs
/// reconnect with back-off; apps redial on their next `connect`.
pub const SHUTTING_DOWN: VarInt = VarInt::from_u32(2);

/// 3 — the peer violated the protocol.
///
/// Sent by the relay (connection close on a malformed or out-of-place control frame or a
/// handshake without a raw Ed25519 key; stream reset when a hub answers a `ChannelAnnounce` with
/// a wrong or malformed frame, or when a peer sends bytes on a channel stream), by the hub
/// connector (connection close on an unexpected control frame; stream reset on a relay stream
/// without a valid announce or an end-to-end stream without `StreamOpen`; close of an
/// end-to-end connection whose key is not the announced one), and by apps (connection close when the relay's key
/// is not the pinned one).
pub const PROTOCOL: VarInt = VarInt::from_u32(3);

/// 4 — a key was removed from an allow-list.
///
/// Sent by the relay (connection close to a hub whose name is no longer authorized for its
/// key; resets of both channel streams of a revoked app key's channels), by the hub connector
/// (close of a revoked app key's end-to-end connections, and of one that fails the
/// post-handshake re-check), and by apps (close of an end-to-end connection whose channel the
/// relay cut with this code).
pub const REVOKED: VarInt = VarInt::from_u32(4);

/// 5 — a limit cut the stream or the connection.
///
/// Sent by the relay, as resets/stops of both channel streams of a channel idle for longer than
/// `idle_session_timeout`; by the hub connector, as the stop of a stream over
/// `max_streams_per_app` (after its typed refusal) and the close of an end-to-end connection over
/// `max_connections_per_app`; and by the relay as a connection close (the reason names
/// the limit) to a connection that holds nothing authorized at its review
/// (`unauthorized_grace`, `max_idle_apps_per_hub`) or to a stranger's connection over
/// `max_unauthorized_connections`.
pub const LIMIT: VarInt = VarInt::from_u32(5);

/// Every code with its name, in code order (for logs, docs and tests).
pub const ALL: [(VarInt, &str); 6] = [
    (NORMAL, "NORMAL"),
    (REPLACED, "REPLACED"),
    (SHUTTING_DOWN, "SHUTTING_DOWN"),
    (PROTOCOL, "PROTOCOL"),
    (REVOKED, "REVOKED"),
    (LIMIT, "LIMIT"),
];

/// The name of a known code, for log lines (`None` for a code this build does not know).
pub fn name(code: VarInt) -> Option<&'static str> {
    ALL.iter().find(|(c, _)| *c == code).map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_distinct_and_named() {
        // The numbers are on the wire: changing one breaks every deployed peer.
        let numbers: Vec<u64> = ALL.iter().map(|(c, _)| c.into_inner()).collect();
        assert_eq!(numbers, [0, 1, 2, 3, 4, 5]);
        assert_eq!(name(LIMIT), Some("LIMIT"));
        assert_eq!(name(REPLACED), Some("REPLACED"));
        assert_eq!(name(VarInt::from_u32(77)), None);
    }
}
