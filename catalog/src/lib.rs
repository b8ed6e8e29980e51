//! Sluice's repository and catalog.
//!
//! Owns everything Sluice keeps on disk: the content-addressed chunk store, per-disk
//! indexes, backup manifests and the SQLite catalog. Synchronous by design: async code
//! reaches it through one seam in `proxy` on a bounded blocking pool.
