//! A gateway listener's edge settings as configured: the entry's policy,
//! the providers it names and the gateway's own settings (the live edge is
//! `crate::gateway::edge`).

use std::sync::Arc;

use meshwork_core::ingress::Edge as EdgePolicy;
use meshwork_core::jwt_provider::Provider;

/// One `[[gateway.api_keys]]` entry: a name and the SHA-256 of the key
/// (the key itself is never in the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
}

/// A gateway listener's edge settings: the entry's policy, the providers
/// it names (as their entries say) and the gateway's own settings. Part
/// of the listener's identity: a change replaces its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSpec {
    pub policy: EdgePolicy,
    pub providers: Vec<Provider>,
    /// The headers every `jwt-provider` entry sets (claims, payload):
    /// removed from every request on every listener, so a client cannot
    /// supply them through a listener that does not verify tokens.
    pub owned_headers: Vec<String>,
    pub api_keys: Arc<Vec<ApiKey>>,
    pub trusted_hops: u8,
    /// The proxies whose forwarding headers are believed (empty: any peer,
    /// up to `trusted_hops`).
    pub trusted_proxies: Arc<Vec<Cidr>>,
    /// The listener terminates TLS (`X-Forwarded-Proto: https`).
    pub https: bool,
    pub port: u16,
}

/// An address block (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Reads `a.b.c.d/n`, `x::/n` or a bare address.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or address block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: a prefix length from 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(V6(v6), V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}
