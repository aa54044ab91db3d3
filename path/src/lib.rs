//! Keyway's path layer: what apps and hubs share below their end-to-end QUIC connections.
//!
//! An app and its hub run one end-to-end QUIC connection whose packets the relay forwards
//! unread. quinn sees one stable *virtual address* for the peer ([`addr`]); the path socket
//! ([`socket`]) maps it to the paths that actually reach the peer, today a channel through the
//! relay under a 9-byte header, and carries the QUIC connection to the relay itself on the same
//! UDP socket. The rest is split by concern:
//! * [`table`]: the per-socket path table (channel ids, routes, held datagrams, counters);
//! * [`route`]: a peer's paths and the decisions over them (which to send on, which is
//!   suspect), pure with the clock passed in;
//! * `recv` and `outbox`: cutting received batches into runs quinn can take, and joining
//!   quinn's transmits into GSO sends;
//! * `pulse`: whether the relay still answers the socket, and the signal to nudge the relay
//!   connection when it does not (a NAT that rebound the socket);
//! * [`relay_link`]: dialing the relay with its key pinned, the shared transport timers;
//! * [`stream`]: a QUIC stream as one tokio byte stream.
//!
//! Errors are [`PathError`]; the app library and the hub connector each map it into their own.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod addr;
pub mod error;
mod outbox;
mod pulse;
mod recv;
pub mod relay_link;
pub mod route;
pub mod socket;
pub mod stream;
pub mod table;

pub use error::{PathConfigError, PathError};
pub use socket::{bind_path_endpoint, e2e_transport_config};
pub use stream::QuicBiStream;
pub use table::{ChannelBinding, PathStats, Paths, HELD_MAX, HELD_TIME};
