//! A child process's stdout read line by line, each line waited for at most [`PATIENCE`]: the
//! shipped binaries print what an operator needs (keys, the listening address, the metrics URL)
//! and the CLI-level tests read it back from there.

use std::io::{BufRead, BufReader};
use std::process::ChildStdout;
use std::sync::mpsc;

use crate::PATIENCE;

/// The lines of a child's stdout, read on a thread of their own (so the child never blocks on a
/// full pipe and a wait can time out).
pub struct Lines {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    pub fn new(stdout: ChildStdout) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { rx, seen: Vec::new() }
    }

    /// Reads lines until `pick` returns `Some` for one, and returns that. Fails the test, naming
    /// `what` and showing every line so far, if stdout closes or no next line comes within
    /// [`PATIENCE`].
    #[track_caller]
    pub fn until<T>(&mut self, what: &str, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        loop {
            let Ok(line) = self.rx.recv_timeout(PATIENCE) else {
                panic!("never saw {what}; got {:#?}", self.seen);
            };
            let picked = pick(&line);
            self.seen.push(line);
            if let Some(v) = picked {
                return v;
            }
        }
    }

    /// Every line read so far, the picked ones included.
    pub fn into_seen(self) -> Vec<String> {
        self.seen
    }
}
