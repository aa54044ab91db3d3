//! rustls configurations that authenticate both sides by pinned Ed25519 raw public keys.
//!
//! TLS 1.3 only, Ed25519 only, RFC 7250 raw public keys in both directions, the `ring`
//! provider. The same configs serve the QUIC link to the relay (through quinn) and the
//! end-to-end TLS that app and hub run inside a spliced stream (through tokio-rustls).
//!
//! * The **client** pins exactly one server key. A mismatch fails the handshake, and the
//!   [`KeyMismatch`] (expected and seen fingerprints) is kept in a [`MismatchSlot`] so callers
//!   can report a typed error rather than quinn's generic "connection lost".
//! * The **server** asks an [`Authorizer`] whether a client key is welcome. The hub's authorizer
//!   reads an allow-list that changes at run time; the relay's admits any key and authorizes
//!   per request.
//!
//! **Resumption pitfall:** a resumed session (ticket, 0-RTT) skips both verifiers. Every place
//! that authorizes a key must therefore call [`Authorizer::authorize`] again on the peer key
//! read back after the handshake ([`quic_peer_key`], [`peer_key_from_certs`]).

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};

use crate::identity::{Identity, PublicKey};

/// Why building a TLS configuration failed (never caused by network input).
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    /// quinn refuses a rustls config without a cipher suite it can use for Initial packets.
    #[error("QUIC does not accept this TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The peer presented a key other than the pinned one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer key mismatch: expected {} ({}), saw {} ({})", expected.fingerprint(), expected, seen.fingerprint(), seen)]
pub struct KeyMismatch {
    pub expected: PublicKey,
    pub seen: PublicKey,
}

/// The peer's key is valid but not authorized.
#[derive(Debug, Clone, thiserror::Error)]
#[error("key {} ({key}) is not authorized: {why}", key.fingerprint())]
pub struct NotAuthorized {
    pub key: PublicKey,
    pub why: String,
}

/// Where a pinned-key client config records the last mismatch it saw.
#[derive(Debug, Clone, Default)]
pub struct MismatchSlot(Arc<Mutex<Option<KeyMismatch>>>);

impl MismatchSlot {
    /// Takes the recorded mismatch, if any.
    pub fn take(&self) -> Option<KeyMismatch> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
    fn record(&self, mismatch: KeyMismatch) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(mismatch);
        }
    }
}

/// Decides whether a client key may complete a handshake (and, called again after the
/// handshake, whether it still may: see the module docs on resumption).
pub trait Authorizer: Send + Sync + fmt::Debug {
    fn authorize(&self, key: &PublicKey) -> Result<(), NotAuthorized>;
}

/// Admits every valid key: the relay authorizes per registration and per session instead.
#[derive(Debug, Default)]
pub struct AnyKey;

impl Authorizer for AnyKey {
    fn authorize(&self, _key: &PublicKey) -> Result<(), NotAuthorized> {
        Ok(())
    }
}

/// A set of keys that can be swapped at run time, shared between the TLS verifier and
/// whoever reloads it (the hub's `authorized_apps`).
#[derive(Debug, Clone, Default)]
pub struct AllowList(Arc<RwLock<HashSet<PublicKey>>>);

impl AllowList {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        Self(Arc::new(RwLock::new(keys.into_iter().collect())))
    }
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.0.read().map(|set| set.contains(key)).unwrap_or(false)
    }
    /// Replaces the whole set; returns the keys that were removed.
    pub fn replace(&self, keys: impl IntoIterator<Item = PublicKey>) -> Vec<PublicKey> {
        let new: HashSet<PublicKey> = keys.into_iter().collect();
        match self.0.write() {
            Ok(mut set) => {
                let removed = set.difference(&new).copied().collect();
                *set = new;
                removed
            }
            Err(_) => Vec::new(),
        }
    }
    /// A sorted snapshot (sorted so that publishing it is deterministic).
    pub fn snapshot(&self) -> Vec<PublicKey> {
        let mut keys: Vec<_> = self.0.read().map(|s| s.iter().copied().collect()).unwrap_or_default();
        keys.sort();
        keys
    }
    pub fn len(&self) -> usize {
        self.0.read().map(|s| s.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Authorizer for AllowList {
    fn authorize(&self, key: &PublicKey) -> Result<(), NotAuthorized> {
        if self.contains(key) {
            Ok(())
        } else {
            Err(NotAuthorized { key: *key, why: "not in the allow-list".into() })
        }
    }
}

/// The crypto provider every Keyway endpoint uses: ring, TLS 1.3 suites, X25519 first, and
/// AES-128-GCM with SHA-256 preferred over ring's first choice, AES-256-GCM with SHA-384.
///
/// Why: the suite a client lists first is the one its server picks, and it protects every
/// byte of the end-to-end connection and derives every handshake's keys. AES-128 runs 10
/// rounds per block where AES-256 runs 14, and SHA-256 has CPU instructions (SHA-NI) where
/// SHA-384 runs in software; both suites are TLS 1.3's own, and 128-bit keys are the strength
/// the rest of the design has (X25519, Ed25519, QUIC's Initial protection). The other two
/// suites stay offered, so a peer that prefers them still connects. Measured in
/// `loadtest/README.md` (bulk and handshakes, before and after).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites =
        vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(provider)
}

fn signature_algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The raw-public-key "certificate" plus signing key for `identity`.
fn certified_key(
    identity: &Identity,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsConfigError> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.to_pkcs8_der()?));
    let signing = provider.key_provider.load_private_key(der)?;
    let spki = CertificateDer::from(identity.public_key().to_spki());
    Ok(Arc::new(CertifiedKey::new(vec![spki], signing)))
}

/// Reads the Ed25519 key out of the peer's RFC 7250 certificate list.
pub fn peer_key_from_certs(certs: &[CertificateDer<'_>]) -> Option<PublicKey> {
    match certs {
        [only] => PublicKey::from_spki(only.as_ref()).ok(),
        _ => None,
    }
}

/// The authenticated key of the peer of a QUIC connection (resumed or not).
pub fn quic_peer_key(conn: &quinn::Connection) -> Option<PublicKey> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    peer_key_from_certs(&certs)
}

fn verify_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoSignatureSchemesInCommon));
    }
    let spki = SubjectPublicKeyInfoDer::from(cert.as_ref());
    verify_tls13_signature_with_raw_key(message, &spki, dss, &signature_algorithms())
}

fn bad_cert(err: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

fn parse_peer_key(cert: &CertificateDer<'_>) -> Result<PublicKey, rustls::Error> {
    PublicKey::from_spki(cert.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
}

/// Client-side verifier: the server must present exactly the pinned key.
#[derive(Debug)]
struct PinnedServer {
    expected: PublicKey,
    mismatch: MismatchSlot,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        }
        let seen = parse_peer_key(end_entity)?;
        if seen != self.expected {
            let mismatch = KeyMismatch { expected: self.expected, seen };
            self.mismatch.record(mismatch.clone());
            return Err(bad_cert(mismatch));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Server-side verifier: a client key is required and must satisfy the [`Authorizer`].
#[derive(Debug)]
struct AuthorizedClients {
    authorizer: Arc<dyn Authorizer>,
}

impl ClientCertVerifier for AuthorizedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        }
        let key = parse_peer_key(end_entity)?;
        self.authorizer.authorize(&key).map_err(bad_cert)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The server name every pinned-key client uses with quinn. SNI is switched off, so the name
/// only keys the client's session cache; the pinned key, not a name, identifies the server.
pub const SERVER_NAME: &str = "keyway.invalid";

/// The server name an app uses for the end-to-end connection to the hub with `hub_key`.
///
/// SNI is off, so it is never sent; it only keys the client's session store. One name per hub
/// key means one store can serve every hub of an app (and a store the app provides, shared
/// across `Client`s): a ticket from one hub is never offered to another, where it would fail
/// and tell that hub which other hub the app talks to.
pub fn e2e_server_name(hub_key: &PublicKey) -> String {
    let short = hub_key.as_bytes().get(..16).unwrap_or_default();
    format!("h{}.keyway.invalid", data_encoding::HEXLOWER.encode(short))
}

/// Number of single-use TLS 1.3 tickets a hub sends per end-to-end handshake: one for the next
/// connection and one spare, so an app whose resumed attempt is lost still holds one.
pub const TICKETS_PER_HANDSHAKE: usize = 2;

/// Turns on single-use tickets and 0-RTT on a server config (the hub's end-to-end one).
///
/// Tickets are *stateful*: the hub keeps each session in a memory store of `sessions` entries
/// and rustls `take`s it on use, so a ticket resumes at most once and a replayed first flight
/// (a relay can capture and resend it) finds no session, gets a full handshake and its early
/// data rejected. A hub restart forgets every session: every app is cold once (acceptable;
/// stateless tickets would survive a restart but could be replayed). The store evicts the
/// oldest when full: size it as apps × [`TICKETS_PER_HANDSHAKE`] × connections per app.
/// `max_early_data_size` is the value QUIC requires (RFC 9001: the 0-RTT limit is the
/// transport's flow control, not TLS's).
pub fn enable_single_use_tickets(config: &mut rustls::ServerConfig, sessions: usize) {
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(sessions.max(1));
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    config.max_early_data_size = u32::MAX;
}

/// The same for tokio-rustls (the tests below run the configs over an in-memory pipe), which
/// wants a typed name: an IP literal, so no parsing can fail.
#[cfg(test)]
fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED).into())
}

/// A TLS client config that presents `identity` and pins `server_key`.
pub fn client_config(
    identity: &Identity,
    server_key: PublicKey,
    alpn: &[u8],
) -> Result<(rustls::ClientConfig, MismatchSlot), TlsConfigError> {
    let provider = provider();
    let key = certified_key(identity, &provider)?;
    let mismatch = MismatchSlot::default();
    let verifier = Arc::new(PinnedServer { expected: server_key, mismatch: mismatch.clone() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(rustls::client::AlwaysResolvesClientRawPublicKeys::new(key)));
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_sni = false;
    Ok((config, mismatch))
}

/// A TLS server config that presents `identity` and admits clients per `authorizer`.
pub fn server_config(
    identity: &Identity,
    authorizer: Arc<dyn Authorizer>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let provider = provider();
    let key = certified_key(identity, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AuthorizedClients { authorizer }))
        .with_cert_resolver(Arc::new(rustls::server::AlwaysResolvesServerRawPublicKeys::new(key)));
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The QUIC crypto config of a client that pins `server_key`.
pub fn quic_client_crypto(
    identity: &Identity,
    server_key: PublicKey,
    alpn: &[u8],
) -> Result<(Arc<quinn::crypto::rustls::QuicClientConfig>, MismatchSlot), TlsConfigError> {
    let (config, mismatch) = client_config(identity, server_key, alpn)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config)?;
    Ok((Arc::new(quic), mismatch))
}

/// The QUIC crypto config of a server presenting `identity`.
pub fn quic_server_crypto(
    identity: &Identity,
    authorizer: Arc<dyn Authorizer>,
    alpn: &[u8],
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsConfigError> {
    let config = server_config(identity, authorizer, alpn)?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(config)?;
    Ok(Arc::new(quic))
}

/// The QUIC endpoint config of a server that serves as `identity` (the relay).
///
/// Both secrets quinn keeps per endpoint are derived from the key instead of drawn at random
/// per process: the stateless-reset key and the key that makes connection IDs verifiable. So
/// after a crash and restart with the same key file, the relay recognises packets of
/// connections it no longer knows as its own and answers them with a stateless reset the peer
/// can verify: hubs and apps learn at once that their connection is gone and redial, instead
/// of waiting for a ping or an idle timeout on a dead connection.
pub fn endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    node_endpoint_config(identity, None)
}

/// [`endpoint_config`] for one node of a cluster whose nodes share `identity` (apps and hubs pin
/// one key for the whole cluster): with `Some(node)`, both secrets are derived from the key
/// *and* the node's stable id. Shared secrets would let every node recognise every sibling's
/// connection IDs and answer a packet that reached the wrong node (a load balancer remap,
/// anycast) with a reset the peer accepts, killing a live connection; per-node secrets make
/// such a packet an unknown one, which quinn drops. The id must be stable across restarts (not
/// drawn per start), or a crashed node could no longer reset its own old connections. A node's
/// connection IDs also name it, so that a load balancer can route on them ([`crate::cid`]).
/// `None` derives exactly what [`endpoint_config`] always did.
pub fn node_endpoint_config(identity: &Identity, node: Option<&str>) -> quinn::EndpointConfig {
    // The label of a node's secret adds the id after a character no node id contains, so no
    // node's labels equal the single-node ones or another node's.
    let label = |base: &str| match node {
        None => base.to_owned(),
        Some(node) => format!("{base} node={node}"),
    };
    let reset = identity.derive_secret(&label("keyway quic stateless reset v1"));
    let mut config =
        quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset)));
    let cid = identity.derive_secret(&label("keyway quic connection id v1"));
    match node {
        // A node's IDs name it, for a load balancer in front of the cluster (see `cid`).
        Some(node) => {
            let server = crate::cid::ServerId::of_node(node);
            config.cid_generator(move || Box::new(crate::cid::NodeCidGenerator::new(server, &cid)));
        }
        // 62 random bits: a restarted relay must not issue its previous run's IDs again.
        None => {
            config.cid_generator(move || Box::new(crate::cid::RelayCidGenerator::new(&cid)));
        }
    }
    // quinn sends at most one stateless reset per `min_reset_interval` (20 ms by default) for
    // the whole endpoint, and judges it by one timestamp per receive batch: after a crash that
    // is ~50 resets/s, while every hub of the previous run sends a keep-alive per interval
    // (100 000 hubs / 15 s ≈ 6 700/s), so most hubs waited for their liveness ping. No
    // interval: every packet of a previous run is answered. What bounds it instead: a reset
    // answers only a short-header packet whose connection ID this key generated, it is always
    // smaller than that packet (quinn pads to at most one byte less; so a reflected flood is
    // never amplified and two endpoints resetting each other shrink to nothing), and its cost
    // is one HMAC and one send, below what quinn already spends on the packet that caused it.
    config.min_reset_interval(std::time::Duration::ZERO);
    // The relay's socket also carries channel datagrams (first byte below 0x40): quinn must
    // never send a packet that looks like one, nor ask its peers to.
    config.grease_quic_bit(false);
    config
}

/// The QUIC endpoint config of an app or hub endpoint, whose socket carries the relay
/// connection and, under the channel header, end-to-end connections: QUIC-bit greasing off (see
/// [`crate::channel`]); random reset and connection-ID keys, as quinn draws them.
pub fn peer_endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.grease_quic_bit(false);
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    struct Outcome {
        /// The suite the client saw negotiated.
        client: std::io::Result<Option<rustls::CipherSuite>>,
        server: std::io::Result<Option<PublicKey>>,
    }

    async fn handshake(
        client_id: &Identity,
        pinned: PublicKey,
        server_id: &Identity,
        allow: AllowList,
    ) -> (Outcome, MismatchSlot) {
        let (client_cfg, slot) = client_config(client_id, pinned, crate::ALPN_E2E).unwrap();
        let server_cfg = server_config(server_id, Arc::new(allow), crate::ALPN_E2E).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = TlsConnector::from(Arc::new(client_cfg));
        let acceptor = TlsAcceptor::from(Arc::new(server_cfg));
        let client = async move {
            let mut tls = connector.connect(server_name(), a).await?;
            tls.write_all(b"ping").await?;
            tls.flush().await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"pong");
            Ok(tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()))
        };
        let server = async move {
            let mut tls = acceptor.accept(b).await?;
            let key = peer_key_from_certs(tls.get_ref().1.peer_certificates().unwrap_or_default());
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(b"pong").await?;
            tls.flush().await?;
            Ok(key)
        };
        let (client, server) = tokio::join!(client, server);
        (Outcome { client, server }, slot)
    }

    #[tokio::test]
    async fn pinned_keys_authenticate_both_ways() {
        let app = Identity::from_seed([1; 32]);
        let hub = Identity::from_seed([2; 32]);
        let (out, slot) = handshake(&app, hub.public_key(), &hub, AllowList::new([app.public_key()])).await;
        // The suite `provider` puts first (see there why), not ring's AES-256-GCM-SHA384.
        assert_eq!(out.client.unwrap(), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert_eq!(out.server.unwrap(), Some(app.public_key()));
        assert!(slot.take().is_none());
    }

    #[tokio::test]
    async fn wrong_server_key_names_expected_and_seen() {
        let app = Identity::from_seed([1; 32]);
        let hub = Identity::from_seed([2; 32]);
        let impostor = Identity::from_seed([3; 32]);
        let (out, slot) =
            handshake(&app, hub.public_key(), &impostor, AllowList::new([app.public_key()])).await;
        assert!(out.client.is_err());
        assert!(out.server.is_err());
        let mismatch = slot.take().expect("mismatch recorded");
        assert_eq!(mismatch, KeyMismatch { expected: hub.public_key(), seen: impostor.public_key() });
        let text = mismatch.to_string();
        assert!(
            text.contains(&hub.public_key().fingerprint())
                && text.contains(&impostor.public_key().fingerprint())
        );
    }

    #[tokio::test]
    async fn unauthorized_client_is_refused_by_the_server() {
        let app = Identity::from_seed([1; 32]);
        let hub = Identity::from_seed([2; 32]);
        let (out, _) = handshake(&app, hub.public_key(), &hub, AllowList::new([])).await;
        let err = out.server.unwrap_err();
        assert!(err.to_string().contains("not in the allow-list"), "{err}");
        assert!(out.client.is_err());
    }

    #[test]
    fn allow_list_replace_reports_removed_keys() {
        let a = Identity::from_seed([1; 32]).public_key();
        let b = Identity::from_seed([2; 32]).public_key();
        let list = AllowList::new([a, b]);
        assert_eq!(list.replace([b]), vec![a]);
        assert!(!list.contains(&a) && list.contains(&b));
        assert!(list.authorize(&a).is_err());
        assert_eq!(list.snapshot(), vec![b]);
    }

    #[test]
    fn quic_configs_build() {
        let id = Identity::from_seed([5; 32]);
        quic_client_crypto(&id, id.public_key(), crate::ALPN_RELAY).unwrap();
        quic_server_crypto(&id, Arc::new(AnyKey), crate::ALPN_RELAY).unwrap();
    }
}
