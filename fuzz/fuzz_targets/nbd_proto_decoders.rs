//! Every pure decoder of `proxy::nbd::proto` on arbitrary payloads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::nbd::proto;

fuzz_target!(|data: &[u8]| {
    let _ = proto::InfoRequest::decode(data);
    let _ = proto::MetaContextRequest::decode(data);
    let _ = proto::ServerReply::decode(data);
    let _ = proto::InfoReply::decode(data);
    let _ = proto::MetaContextReply::decode(data);
    let _ = proto::BlockStatusChunk::decode(data);
    let _ = proto::ErrorChunk::decode(proto::reply_type::ERROR_OFFSET, data);
    let _ = proto::ErrorChunk::decode(proto::reply_type::ERROR, data);
    let _ = proto::OffsetHole::decode(data);
    let _ = proto::decode_reply_header(data);
    let _ = proto::decode_export_name(data);
    if let Ok(b) = <&[u8; proto::REQUEST_LEN]>::try_from(data) {
        let _ = proto::Request::decode(b);
    }
});
