//! The daemon's listeners under a flood of idle connections, with its file-descriptor limit
//! lowered to 256 (`prlimit`): 1,000 idle TCP connections to the API port and 1,000 to the
//! NBD port, all from 127.0.0.1, are held open; a new client from another address
//! (127.0.0.2) still gets `/api/v1/health` over TLS and the NBD server's greeting, and the
//! authenticated CLI still answers once the flood is gone. Without per-peer caps the flood
//! would use up the descriptors, and without the accept loop going on after an error the
//! daemon would stop.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use testbed::daemon::Daemon;

/// A TCP connection to `to` from the local address `from` (bind before connect).
fn connect_from(from: Ipv4Addr, to: SocketAddrV4) -> Result<TcpStream> {
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns; it is handed to
    // `TcpStream` (which closes it) only after connect succeeded, and closed on every error.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let local = sockaddr(SocketAddrV4::new(from, 0));
        let remote = sockaddr(to);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0
            || libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            bail!("connect {from} -> {to}: {e}");
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// Lets this test process hold a few thousand sockets.
fn raise_own_fd_limit() -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: 8192,
        rlim_max: 8192,
    };
    // SAFETY: setrlimit with a valid struct; only this process's limit changes.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    ensure!(rc == 0, "setrlimit: {}", std::io::Error::last_os_error());
    Ok(())
}

fn port_of(text: &str, key: &str) -> Result<u16> {
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("{key} in the configuration"))?;
    let port = line
        .rsplit(':')
        .next()
        .unwrap_or("")
        .trim_matches(|c| c == '"' || c == ' ');
    Ok(port.parse()?)
}

#[test]
fn a_flood_of_idle_connections_leaves_the_api_and_nbd_answering_a_new_client() -> Result<()> {
    raise_own_fd_limit()?;
    let dir = tempfile::tempdir()?;
    let d = Daemon::start_as(dir.path(), "libvirt_uri = \"qemu:///system\"\n", |argv| {
        let mut c = Command::new("prlimit");
        c.arg("--nofile=256:256").arg("--").args(&argv);
        c
    })?;
    let config = std::fs::read_to_string(dir.path().join("sluice.toml"))?;
    let local = Ipv4Addr::LOCALHOST;
    let api = SocketAddrV4::new(local, port_of(&config, "listen")?);
    let nbd = SocketAddrV4::new(local, port_of(&config, "nbd_listen")?);

    let mut flood = Vec::new();
    for _ in 0..1000 {
        flood.push(connect_from(local, api)?);
        flood.push(connect_from(local, nbd)?);
    }
    std::thread::sleep(Duration::from_millis(500));

    let other = Ipv4Addr::new(127, 0, 0, 2);
    let health = Command::new("curl")
        .args(["-sk", "--max-time", "10", "--interface", "127.0.0.2"])
        .arg(format!("{}/api/v1/health", d.url))
        .output()
        .context("curl (apt install curl)")?;
    let body = String::from_utf8_lossy(&health.stdout);
    ensure!(
        health.status.success() && body.contains("ok"),
        "health from 127.0.0.2 during the flood: {} {body} {}",
        health.status,
        String::from_utf8_lossy(&health.stderr)
    );
    let mut s = connect_from(other, nbd)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic)
        .context("the nbd greeting from 127.0.0.2 during the flood")?;
    ensure!(&magic == b"NBDMAGIC", "nbd greeting: {magic:?}");
    drop(s);

    drop(flood);
    std::thread::sleep(Duration::from_millis(500));
    let list = d.ok(&["hypervisor", "list"])?;
    ensure!(
        list.is_array(),
        "the authenticated cli after the flood: {list}"
    );
    Ok(())
}
