//! The server's option and request parsing: client bytes from the input, either raw (first
//! byte odd) or after a valid handshake so the input drives the transmission phase, against a
//! writable in-memory export. Must never panic or hang; closed connections are fine.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use proxy::nbd::{BoxStream, MemoryExport, Server, ServerOptions};
use sluice_fuzz::{block_on, client_handshake, FuzzStream};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut input = if mode & 1 == 0 { client_handshake() } else { Vec::new() };
    input.extend_from_slice(rest);
    block_on(async move {
        let server = Server::new(ServerOptions::default());
        server.add_export("disk", Arc::new(MemoryExport::new(1 << 20, true)));
        let stream: BoxStream = Box::new(FuzzStream::new(input));
        let _ = server.serve_stream(stream).await;
    });
});
