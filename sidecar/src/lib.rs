//! The Meshwork sidecar: the agent next to every service instance
//! ([`agent`]), its configuration ([`config`]), the admin listener
//! ([`admin`]), systemd notification ([`notify`]) and the discovery of
//! upstream endpoints for the proxy ([`discovery`]).

pub mod admin;
pub mod agent;
pub mod config;
pub mod discovery;
pub mod notify;
