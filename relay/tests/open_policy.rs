//! The open name policy (first key to register a free name keeps it) with a bindings file:
//! a registration refused for `max_hubs` leaves no binding behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::*;

#[tokio::test]
async fn a_registration_over_max_hubs_claims_no_name() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("bindings");
    let policy = NamePolicy::Open { state_file: Some(state.clone()) };
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), identity(), policy);
    config.limits = Limits { max_hubs: 1, ..Limits::default() };
    let h = Relay::start(config).await.unwrap();

    let (first, second) = (identity(), identity());
    let _a = registered_hub(&h, &first, "first", &[]).await;
    let conn = connect(&h, &second).await;
    let (_control, answer) = register(&conn, "second", &[], false).await;
    let Frame::Refused { reason, message } = answer else { panic!("expected a refusal, got {answer:?}") };
    assert_eq!(reason, RefusalReason::OverLimit, "{message}");
    let bindings = std::fs::read_to_string(&state).unwrap();
    assert!(bindings.contains("first "), "{bindings}");
    assert!(!bindings.contains("second "), "a refused registration claimed its name: {bindings}");
}
