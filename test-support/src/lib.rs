//! What Keyway's tests and load generator share, so that each helper exists once: the bounded
//! waits and their one [`PATIENCE`] ([`wait`]), deterministic payloads ([`payload`](mod@payload)), the TCP
//! echo service a hub forwards to in tests ([`echo`]), test identities and names ([`ids`]), and
//! a raw protocol peer that speaks the relay's wire without the client library ([`raw`]), a
//! recording UDP hop on a peer's leg to the relay ([`tap`]); for
//! the CLI-level tests, a child's stdout read line by line ([`child`]) and plain GETs against
//! the operator listeners ([`http`]); a real Redis for the cluster tests ([`redis`](mod@redis)).
//!
//! It depends on `keyway-proto` and no other workspace crate: the relay and the hub connector
//! use it as a dev-dependency, and a dev-dependency back on them would give their unit tests
//! two copies of their own crate. Harness parts that need the relay, hub or client libraries
//! (in-process relays, `RelayProcess`) stay in `keyway-e2e`, which builds on this crate.
//!
//! With `default-features = false` only the std parts remain ([`PATIENCE`], the blocking wait,
//! [`payload`](fn@payload), [`child`], the blocking half of [`http`]): what the netbed harness
//! takes, which drives the shipped binaries only.

pub mod child;
#[cfg(feature = "async")]
pub mod echo;
pub mod http;
#[cfg(feature = "async")]
pub mod ids;
pub mod payload;
#[cfg(feature = "async")]
pub mod raw;
pub mod redis;
#[cfg(feature = "async")]
pub mod tap;
pub mod wait;

#[cfg(feature = "async")]
pub use echo::{echo_service, try_echo_service};
#[cfg(feature = "async")]
pub use ids::{fresh_seed, identity, identity_for, name};
pub use payload::payload;
#[cfg(feature = "async")]
pub use wait::{eventually, within};
pub use wait::{eventually_blocking, PATIENCE, POLL};
