//! What sidecars tell the registry about themselves, kept in each server's
//! memory (no Raft write): [`sidecars`], the config each has applied.

pub mod sidecars;
pub mod topology;
