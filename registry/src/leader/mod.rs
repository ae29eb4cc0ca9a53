//! What only the leader runs: the health checks registered over REST and
//! the TTL and deregistration timers ([`health`]), sidecar heartbeat
//! sessions ([`liveness`]), the TTL clock of Consul sessions ([`session_ttl`]), tombstone garbage collection ([`gc`]) and
//! autopilot's dead-server cleanup ([`autopilot`]), the mesh CA's first root
//! and the pruning of rotated-out ones ([`ca`]), and the ACL bootstrap of
//! a fresh cluster ([`acl_bootstrap`], which also runs on a follower given
//! `--acl-bootstrap-file`). Each watches
//! leadership and starts afresh, with a full period of grace, when this
//! server becomes leader; each changes state only by proposing commands
//! through [`crate::cluster`].

pub mod acl_bootstrap;
pub mod autopilot;
pub mod ca;
pub mod gc;
pub mod health;
pub mod liveness;
pub mod session_ttl;
