//! Smoke tests of the `keyway` binary: key files and their public keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::Command;

fn keyway() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyway"));
    // Keep a developer's environment from leaking into the test.
    cmd.env_remove("KEYWAY_CONFIG").env_remove("KEYWAY_OUT");
    cmd
}

#[test]
fn keygen_writes_a_private_file_and_pubkey_prints_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.key");
    let out = keyway().args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let key: keyway_proto::PublicKey = printed.trim().parse().unwrap();

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    let out = keyway().arg("pubkey").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), key.to_string());
    // The private key never reaches stdout or stderr.
    let pem = std::fs::read_to_string(&path).unwrap();
    let secret_line = pem.lines().nth(1).unwrap();
    assert!(!printed.contains(secret_line) && !String::from_utf8_lossy(&out.stderr).contains(secret_line));
}

#[test]
fn keygen_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.key");
    assert!(keyway().args(["keygen", "--out"]).arg(&path).status().unwrap().success());
    let before = std::fs::read(&path).unwrap();
    let out = keyway().args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[cfg(unix)]
#[test]
fn pubkey_refuses_a_world_readable_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.key");
    assert!(keyway().args(["keygen", "--out"]).arg(&path).status().unwrap().success());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = keyway().arg("pubkey").arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}
