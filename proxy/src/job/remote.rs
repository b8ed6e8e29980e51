//! How a backup reaches a remote hypervisor's exports: QEMU there serves them over TCP with
//! TLS (its own certificate, libvirt's `backup_tls_x509_cert_dir`), on a port of a range the
//! operator opened, bound to the address the hypervisor listens on; the proxy dials the
//! address (and checks the TLS name) it reaches the hypervisor by, which may differ behind
//! NAT or a port forward, and presents its client certificate.
//!
//! Owns the choice of port: two jobs of this process on one hypervisor never get the same
//! port (a lease held for the job), and a port something already answers on is skipped.

use std::collections::HashSet;
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::hypervisor::TcpServer;
use crate::nbd::ClientTls;

use super::error::{Error, ErrorKind, Result};

/// The data path to one remote hypervisor.
#[derive(Debug, Clone)]
pub struct RemoteData {
    /// What QEMU binds on the hypervisor (libvirt's `<server name=…>`).
    pub listen: String,
    /// What the proxy dials to reach those ports.
    pub connect: String,
    /// Ports QEMU may serve backup exports on.
    pub ports: RangeInclusive<u16>,
    /// The CA the hypervisor's certificate must chain to, the name it must carry, and the
    /// proxy's client certificate.
    pub tls: ClientTls,
    /// Whether a shut-off VM may be started paused (its CPUs never run) for its backup.
    pub start_offline: bool,
    /// A directory on the hypervisor for the jobs' scratch files (`None`: libvirt puts each
    /// beside its image, which only image files allow).
    pub scratch_dir: Option<std::path::PathBuf>,
}

/// How long a probe of a port waits for an answer.
const PROBE: Duration = Duration::from_millis(300);

fn leased() -> &'static Mutex<HashSet<(String, u16)>> {
    static LEASED: OnceLock<Mutex<HashSet<(String, u16)>>> = OnceLock::new();
    LEASED.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A port of [`RemoteData::ports`] held by one job; free again when dropped.
#[derive(Debug)]
pub struct PortLease {
    connect: String,
    server: TcpServer,
}

impl PortLease {
    /// Where QEMU is to serve the job's exports.
    pub fn server(&self) -> &TcpServer {
        &self.server
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        let mut held = leased().lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&(self.connect.clone(), self.server.port));
    }
}

impl RemoteData {
    /// The first port of the range that no job of this process holds and nothing answers
    /// on, held until the lease is dropped.
    pub fn lease_port(&self) -> Result<PortLease> {
        for port in self.ports.clone() {
            let key = (self.connect.clone(), port);
            if !leased()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key)
            {
                continue;
            }
            let lease = PortLease {
                connect: self.connect.clone(),
                server: TcpServer {
                    listen: self.listen.clone(),
                    port,
                },
            };
            if !answers(&self.connect, port) {
                return Ok(lease);
            }
        }
        Err(Error::new(
            ErrorKind::Retry,
            format!(
                "no free port for a backup export on {} in {}-{} (every port is in use or held by a running job)",
                self.connect,
                self.ports.start(),
                self.ports.end()
            ),
        ))
    }
}

/// Whether something accepts connections on `host:port`.
fn answers(host: &str, port: u16) -> bool {
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, PROBE).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(ports: RangeInclusive<u16>) -> RemoteData {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        RemoteData {
            scratch_dir: None,
            listen: "127.0.0.1".into(),
            connect: "127.0.0.1".into(),
            ports,
            tls: ClientTls::new(&ca, "localhost", None).unwrap(),
            start_offline: true,
        }
    }

    #[test]
    fn two_jobs_never_share_a_port_and_a_port_in_use_is_skipped() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = busy.local_addr().unwrap().port();
        // The range starts at the busy port; the next one is (almost surely) free.
        let d = data(p..=p.saturating_add(2));
        let a = d.lease_port().unwrap();
        let b = d.lease_port().unwrap();
        assert_ne!(a.server().port, p, "a port something answers on is skipped");
        assert_ne!(a.server().port, b.server().port, "two leases, two ports");
        let a_port = a.server().port;
        drop(a);
        let c = d.lease_port().unwrap();
        assert_eq!(c.server().port, a_port, "a dropped lease frees its port");
        let one = data(p..=p);
        let e = one.lease_port().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Retry);
        assert!(e.to_string().contains("no free port"), "{e}");
    }
}
