//! Admission of connections to a listener: at most `total` at once, and at most `per_peer`
//! from one peer address, so one client (or one host) cannot use up the process's file
//! descriptors or memory and lock everyone else out. Used by the NBD server and by the API's
//! listener (`api::daemon::serve`). A refused connection is closed at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// The counts of one listener.
#[derive(Debug)]
pub struct Admission {
    total: usize,
    per_peer: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its maximum of connections.
    Full { max: usize },
    /// This peer holds its maximum.
    PeerFull { peer: IpAddr, max: usize },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Full { max } => write!(f, "{max} connections open: refused"),
            Refusal::PeerFull { peer, max } => {
                write!(f, "{peer} holds {max} connections: refused")
            }
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    peer: Option<IpAddr>,
}

impl Admission {
    /// At most `total` connections, `per_peer` of them from one address (both at least 1).
    pub fn new(total: usize, per_peer: usize) -> Arc<Admission> {
        Arc::new(Admission {
            total: total.max(1),
            per_peer: per_peer.max(1),
            open: Mutex::new(Open::default()),
        })
    }

    /// Admits a connection from `peer` (`None`: a unix socket, counted in the total only).
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Permit, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.total {
            return Err(Refusal::Full { max: self.total });
        }
        if let Some(p) = peer {
            let n = open.by_peer.entry(p).or_insert(0);
            if *n >= self.per_peer {
                return Err(Refusal::PeerFull {
                    peer: p,
                    max: self.per_peer,
                });
            }
            *n += 1;
        }
        open.total += 1;
        Ok(Permit {
            admission: self.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(p) = self.peer {
            if let Some(n) = open.by_peer.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    open.by_peer.remove(&p);
                }
            }
        }
    }
}

/// How long an accept loop pauses after an accept error (out of file descriptors, a
/// connection reset before it was accepted) before it accepts again: the error is logged,
/// the listener keeps serving.
pub const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_peer_and_frees_on_drop() {
        let a = Admission::new(3, 2);
        let p1: IpAddr = "10.0.0.1".parse().unwrap();
        let p2: IpAddr = "10.0.0.2".parse().unwrap();
        let x = a.admit(Some(p1)).unwrap();
        let _y = a.admit(Some(p1)).unwrap();
        assert_eq!(
            a.admit(Some(p1)).unwrap_err(),
            Refusal::PeerFull { peer: p1, max: 2 }
        );
        let _z = a.admit(Some(p2)).unwrap();
        assert_eq!(a.admit(None).unwrap_err(), Refusal::Full { max: 3 });
        drop(x);
        assert_eq!(a.open(), 2);
        let _w = a.admit(Some(p1)).unwrap();
    }
}
