//! Keyway's load generator: the numbers behind the design's claims, measured against a real
//! relay *process* (the shipped `keyway-relay` binary) with the real hub connector and client
//! libraries on loopback.
//!
//! Every scenario is a plain async function taking its options and returning the measurements
//! as JSON objects ([`Record`]), so the binary (`main.rs`) only parses flags, and the smoke test
//! runs each scenario in seconds with tiny sizes:
//! * [`bulk`]: throughput app → relay → hub → back (end-to-end TLS inside) beside a direct quinn
//!   connection carrying the same payload, 1 and 8 streams;
//! * [`idle`]: many registered, idle hubs; the relay's RSS per hub and its idle CPU;
//! * [`storm`]: a relay restart under N real hub connectors; time until all are back and the
//!   reconnect-rate curve;
//! * [`handshakes`]: raw hubs dialing and registering at fixed arrival rates; completed per
//!   second, latency, and CPU-seconds per handshake on the relay's side and the generator's;
//! * [`setup`]: set-up time in app↔hub round trips with real delay on both legs (cold, new
//!   connection, ticket, ticket + early data, new stream)
//! * [`churn`]: sessions opened and closed at a steady rate; set-up time and echo RTT
//!   percentiles, cold (new relay connection per session) and warm (shared connection);
//! * [`bare`]: a minimal quinn server that answers `Register` like the relay, used to separate
//!   quinn's per-connection cost (and the effect of transport knobs) from the relay's own.
//!
//! [`report`] turns the JSON lines into the README's results table, [`plot`] into SVG figures.

pub mod bare;
pub mod bulk;
pub mod churn;
pub mod common;
pub mod handshakes;
pub mod idle;
pub mod link;
pub mod plot;
pub mod report;
pub mod setup;
pub mod storm;
pub mod storm_raw;

/// One measurement: a flat JSON object with at least a `"scenario"` field.
pub type Record = serde_json::Value;
