//! The client's reply parsing: a valid handshake, then server replies built from the input
//! (framed with plausible cookies, or raw when the first byte is odd) to a read, a block
//! status and a second read in flight. Must never panic or hang; errors are fine.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::nbd::{BoxStream, Client, ClientOptions};
use sluice_fuzz::{block_on, framed_replies, server_handshake, FuzzStream};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut input = if mode & 2 == 0 { server_handshake() } else { Vec::new() };
    if mode & 1 == 0 {
        input.extend_from_slice(&framed_replies(rest));
    } else {
        input.extend_from_slice(rest);
    }
    block_on(async move {
        let stream: BoxStream = Box::new(FuzzStream::new(input));
        let options = ClientOptions {
            export: "disk".into(),
            meta_contexts: vec!["base:allocation".into()],
            ..ClientOptions::default()
        };
        let Ok(client) = Client::from_stream(stream, &options).await else { return };
        let (a, b, c) = (client.clone(), client.clone(), client.clone());
        let _ = tokio::join!(
            async move { a.read(0, 4096).await.map(|_| ()) },
            async move { b.block_status(0, 65536).await.map(|_| ()) },
            async move { c.read(8192, 65536).await.map(|_| ()) },
        );
    });
});
