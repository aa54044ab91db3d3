//! The local admin socket of `keyway-relay run` and `keyway-hub run`, through which their
//! `status --json` finds the running process: a unix stream socket next to the key file
//! ([`socket_path`]), mode 0600, so only the key's owner can ask and nothing is exposed on the
//! network. A connection gets one JSON document (the caller's, built at that moment) and is
//! closed; nothing is read from it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

/// Why `status` found no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no running process answers on {path} (is it running with this key file?)")]
    NotRunning { path: PathBuf, source: io::Error },
    #[error("the process on {path} did not answer")]
    Io { path: PathBuf, source: io::Error },
    #[error("another process already serves {path}")]
    InUse { path: PathBuf },
}

/// The admin socket of a process whose key file is `key_file`: `KEY_FILE.sock` beside it.
pub fn socket_path(key_file: &Path) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".sock");
    PathBuf::from(name)
}

/// The serving task; removes the socket file when dropped.
#[derive(Debug)]
pub struct AdminSocket {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl AdminSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (mode 0600; a stale socket nobody answers on is replaced, a live one is an
/// error) and answers each connection with `status()`.
pub fn serve(
    path: PathBuf,
    status: impl Fn() -> String + Send + Sync + 'static,
) -> Result<AdminSocket, AdminError> {
    use std::os::unix::fs::PermissionsExt;
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(AdminError::InUse { path });
    }
    let io_err = |source| AdminError::Io { path: path.clone(), source };
    // Bound under a temporary name and made 0600 before it takes its real name, so the socket
    // is never reachable with looser permissions.
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    std::fs::rename(&tmp, &path).map_err(io_err)?;
    listener.set_nonblocking(true).map_err(io_err)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(io_err)?;
    let status = Arc::new(status);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut text = status();
            text.push('\n');
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(text.as_bytes())).await;
            });
        }
    });
    Ok(AdminSocket { path, task })
}

/// Asks the process serving `path` for its status (blocking, for a CLI).
pub fn query(path: &Path, timeout: Duration) -> Result<String, AdminError> {
    use std::io::Read;
    let stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| AdminError::NotRunning { path: path.to_owned(), source })?;
    let io_err = |source| AdminError::Io { path: path.to_owned(), source };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    let mut text = String::new();
    stream.take(1 << 20).read_to_string(&mut text).map_err(io_err)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_0600_answers_with_the_status_and_refuses_a_second_server() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir.path().join("hub.key"));
        assert!(path.ends_with("hub.key.sock"));
        let admin = serve(path.clone(), || "{\"ok\":true}".to_owned()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let p = path.clone();
        let text =
            tokio::task::spawn_blocking(move || query(&p, Duration::from_secs(10))).await.unwrap().unwrap();
        assert_eq!(text, "{\"ok\":true}\n");
        assert!(matches!(serve(path.clone(), String::new), Err(AdminError::InUse { .. })));
        drop(admin);
        assert!(!path.exists());
        assert!(matches!(query(&path, Duration::from_secs(1)), Err(AdminError::NotRunning { .. })));
    }
}
