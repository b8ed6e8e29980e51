//! NBD protocol: client and server. Byte encoding lives only in `proto`.
