//! Our NBD server read and written by real clients: `nbdinfo --list` and `--map`, `nbdcopy`,
//! `qemu-img compare` and `convert`, `qemu-io`; our client against our server over TLS; and
//! malformed traffic closing only the offending connection.

use anyhow::Result;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use proxy::nbd::{
    proto, Client, ClientOptions, ClientTls, ErrorKind, Identity, MemoryExport, Server,
    ServerOptions, ServerTls, BASE_ALLOCATION,
};
use testbed::pattern;
use testbed::peers::{make_certs, run, ServerThread};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Data at [0, 2M) and [8M, 9M) + 4 KiB; holes elsewhere (64 KiB granularity).
fn contents() -> Vec<u8> {
    let mut data = vec![0u8; SIZE as usize];
    data[..2 * MIB as usize].copy_from_slice(&pattern(7, 0, 2 * MIB as usize));
    let at = 8 * MIB as usize;
    data[at..at + MIB as usize + 4096].copy_from_slice(&pattern(8, 8 * MIB, MIB as usize + 4096));
    data
}

struct Fixture {
    dir: tempfile::TempDir,
    server: ServerThread,
    data: Vec<u8>,
    rw: Arc<MemoryExport>,
}

fn start() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let data = contents();
    let server = Server::new(ServerOptions::default());
    server.add_export("ro", Arc::new(MemoryExport::from_bytes(&data, false)));
    let rw = Arc::new(MemoryExport::new(SIZE, true));
    server.add_export("rw", rw.clone());
    let server = ServerThread::start(server, &dir.path().join("ours.sock"))?;
    Ok(Fixture {
        dir,
        server,
        data,
        rw,
    })
}

#[test]
fn nbdinfo_lists_exports_and_maps_holes() -> Result<()> {
    let f = start()?;
    let list = run("nbdinfo", &["--list", &f.server.uri("")])?;
    for want in [
        "export=\"ro\"",
        "export=\"rw\"",
        "export-size: 16777216",
        "is_read_only: true",
    ] {
        assert!(list.contains(want), "nbdinfo --list lacks {want}:\n{list}");
    }
    let map = run("nbdinfo", &["--map", &f.server.uri("ro")])?;
    let extents: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            (
                v[0].parse().unwrap(),
                v[1].parse().unwrap(),
                v[2].parse().unwrap(),
            )
        })
        .collect();
    let hole = proto::state::HOLE | proto::state::ZERO;
    let block = 64 * 1024;
    assert_eq!(
        extents,
        vec![
            (0, 2 * MIB, 0),
            (2 * MIB, 6 * MIB, hole),
            (8 * MIB, MIB + block, 0),
            (9 * MIB + block, SIZE - 9 * MIB - block, hole),
        ],
        "nbdinfo --map:\n{map}"
    );
    Ok(())
}

#[test]
fn nbdcopy_and_qemu_img_read_exact_contents() -> Result<()> {
    let f = start()?;
    let raw = f.dir.path().join("copy.raw");
    let raw_s = raw.display().to_string();
    run("nbdcopy", &[&f.server.uri("ro"), &raw_s])?;
    assert!(std::fs::read(&raw)? == f.data, "nbdcopy output differs");
    let reference = f.dir.path().join("reference.raw");
    std::fs::write(&reference, &f.data)?;
    let reference = reference.display().to_string();
    let uri = f.server.uri("ro");
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &reference, &uri],
    )?;
    let qcow2 = f.dir.path().join("copy.qcow2").display().to_string();
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &uri, &qcow2],
    )?;
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &reference, &qcow2],
    )?;
    Ok(())
}

#[tokio::test]
async fn qemu_io_writes_round_trip() -> Result<()> {
    let f = start()?;
    let uri = f.server.uri("rw");
    let cmds = [
        "write -P 0x77 1M 64k",
        "write -P 0x11 3M 1M",
        "write -z 3M 64k",
        "discard 3584k 64k",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    run("qemu-io", &args)?;
    let mut want = vec![0u8; SIZE as usize];
    want[MIB as usize..MIB as usize + 65536].fill(0x77);
    want[3 * MIB as usize + 65536..4 * MIB as usize].fill(0x11);
    want[3584 * 1024..3584 * 1024 + 65536].fill(0);
    assert!(f.rw.contents() == want, "export contents after qemu-io");
    // Read back through our client, and write through it too.
    let opts = ClientOptions {
        export: "rw".into(),
        meta_contexts: vec![BASE_ALLOCATION.into()],
        ..ClientOptions::default()
    };
    let client = Client::connect(&f.server.address(), &opts).await?;
    assert!(client.read(0, SIZE).await? == want);
    let payload = pattern(9, 5 * MIB, MIB as usize);
    client.write(5 * MIB, payload.clone(), true).await?;
    client.write_zeroes(MIB, 65536, false).await?;
    client.trim(3 * MIB + 65536, 65536).await?;
    client.flush().await?;
    want[5 * MIB as usize..6 * MIB as usize].copy_from_slice(&payload);
    want[MIB as usize..MIB as usize + 65536].fill(0);
    want[3 * MIB as usize + 65536..3 * MIB as usize + 131072].fill(0);
    assert!(f.rw.contents() == want);
    let map = client.extents(BASE_ALLOCATION, 0, SIZE).await?;
    assert!(map
        .iter()
        .any(|e| e.offset == 0 && e.length == 3 * MIB + 131072 && e.flags == 3));
    client.disconnect().await?;
    // The read-only export refuses writes before sending them.
    let ro = Client::connect(
        &f.server.address(),
        &ClientOptions {
            export: "ro".into(),
            ..ClientOptions::default()
        },
    )
    .await?;
    let err = ro.write(0, payload, false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    Ok(())
}

fn client_tls(certs: &Path) -> Result<ClientTls> {
    let identity = Identity {
        cert_file: certs.join("client-cert.pem"),
        key_file: certs.join("client-key.pem"),
    };
    Ok(ClientTls::new(
        &certs.join("ca-cert.pem"),
        "localhost",
        Some(&identity),
    )?)
}

#[tokio::test]
async fn our_client_and_server_over_tls() -> Result<()> {
    let certs = tempfile::tempdir()?;
    make_certs(certs.path())?;
    let identity = Identity {
        cert_file: certs.path().join("server-cert.pem"),
        key_file: certs.path().join("server-key.pem"),
    };
    let tls = ServerTls::new(&identity, Some(&certs.path().join("ca-cert.pem")))?;
    let server = Server::new(ServerOptions {
        tls: Some(tls),
        ..ServerOptions::default()
    });
    let data = contents();
    server.add_export("ro", Arc::new(MemoryExport::from_bytes(&data, false)));
    let thread = ServerThread::start(server, &certs.path().join("tls.sock"))?;
    let plain = ClientOptions {
        export: "ro".into(),
        ..ClientOptions::default()
    };
    let err = Client::connect(&thread.address(), &plain)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.to_string().contains("tls required"), "{err}");
    let opts = ClientOptions {
        tls: Some(client_tls(certs.path())?),
        meta_contexts: vec![BASE_ALLOCATION.into()],
        ..plain
    };
    let client = Client::connect(&thread.address(), &opts).await?;
    assert!(client.read(0, SIZE).await? == data);
    assert_eq!(client.extents(BASE_ALLOCATION, 0, SIZE).await?.len(), 4);
    client.disconnect().await?;
    // nbdinfo (libnbd, GnuTLS) reads it too.
    let uri = format!(
        "nbds+unix:///ro?socket={}&tls-certificates={}",
        thread.socket().display(),
        certs.path().display()
    );
    let size = run("nbdinfo", &["--size", &uri])?;
    assert_eq!(size.trim(), SIZE.to_string());
    Ok(())
}

/// Greeting, then fixed newstyle client flags: the raw socket is in option haggling.
fn haggling(socket: &Path) -> Result<UnixStream> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut greeting = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut greeting)?;
    s.write_all(&proto::client_flags::FIXED_NEWSTYLE.to_be_bytes())?;
    Ok(s)
}

/// Whether the server closed the connection after whatever it answered: EOF, or a reset
/// when it closed with our garbage still unread. A timeout means it is still open.
fn closed(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[tokio::test]
async fn malformed_traffic_closes_only_that_connection() -> Result<()> {
    let f = start()?;
    let sock = f.server.socket().to_path_buf();
    let opts = ClientOptions {
        export: "ro".into(),
        ..ClientOptions::default()
    };
    let good = Client::connect(&f.server.address(), &opts).await?;
    // A huge option length is refused without allocating it.
    let mut s = haggling(&sock)?;
    let huge = proto::OptionHeader {
        option: proto::opt::GO,
        length: u32::MAX,
    };
    s.write_all(&huge.encode())?;
    assert!(closed(&mut s));
    // An unknown option is refused per the spec, and the session goes on.
    let mut s = haggling(&sock)?;
    s.write_all(
        &proto::OptionHeader {
            option: 99,
            length: 0,
        }
        .encode(),
    )?;
    let mut head = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut head)?;
    let reply = proto::OptionReplyHeader::decode(&head)?;
    assert_eq!(reply.reply_type, proto::rep::ERR_UNSUP);
    // Garbage instead of an option: closed.
    s.write_all(&[0xde; 64])?;
    assert!(closed(&mut s));
    // The other connection is unaffected.
    assert!(good.read(0, MIB).await? == f.data[..MIB as usize]);
    good.disconnect().await?;
    Ok(())
}
