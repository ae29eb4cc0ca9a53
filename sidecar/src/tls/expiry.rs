//! When a mesh connection's certificate stops being good enough to carry
//! new requests, on both ends of a kept-alive connection:
//!
//! - the client end (the outbound pool): every mesh connection carries the
//!   [`LeafStamp`] of the leaf it was made with. Once that leaf is no
//!   longer the current one (renewed) — or is about to expire (within
//!   [`retire_margin`], which the renewal task marks) — the connection is
//!   retired: the pool hands it out no more, requests on it finish, and it
//!   closes when idle. Renewal comes at ~60 % of a leaf's life, so pooled
//!   connections move to the new leaf long before the old one expires and
//!   no request meets an expired connection. Checking a stamp is one
//!   atomic load ([`super::MeshTls::usable`]): no clock, no lock;
//! - the server end (the inbound listener): each accepted connection
//!   knows when its peer's certificate expires ([`peer_not_after`], the
//!   earliest of the presented chain) and arms one timer for that moment
//!   ([`deadline`]); what the connection then does is the listener's.
//!
//! Pure functions and a value type; nothing here holds a connection.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;

/// Which leaf a mesh connection was made with: the generation of the
/// sidecar's leaf, counted from 1 as leaves are installed (0 is never a
/// leaf's: see [`super::MeshTls::usable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafStamp(pub(super) u64);

/// The most a connection is retired ahead of its leaf's expiry.
pub const RETIRE_MARGIN: Duration = Duration::from_secs(5);

/// How long before a leaf's expiry its connections stop being handed out
/// even when no renewed leaf has come (the registry unreachable): 5 s, or
/// a tenth of the leaf's life for short-lived leaves (a 3 s leaf would
/// otherwise be "about to expire" from the start). `life` counts from when
/// the leaf was received. Renewal at 54–66 % of the life stays well ahead.
pub fn retire_margin(life: Duration) -> Duration {
    RETIRE_MARGIN.min(life / 10)
}

/// The earliest `notAfter` of `chain` (the peer's leaf first, then what
/// it presented to chain it to a root), in Unix seconds: when the peer's
/// credential stops verifying. `None` when a certificate cannot be read
/// (a verified chain always can).
pub fn peer_not_after(chain: &[CertificateDer<'_>]) -> Option<i64> {
    let mut earliest: Option<i64> = None;
    for cert in chain {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let at = parsed.validity().not_after.timestamp();
        earliest = Some(earliest.map_or(at, |e| e.min(at)));
    }
    earliest
}

/// The runtime instant at Unix time `unix` (seconds): now when it has
/// passed. Read once per connection, when its timer is armed.
pub fn deadline(unix: i64) -> tokio::time::Instant {
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::trust::tests::TestCa;

    #[test]
    fn short_leaves_are_retired_a_tenth_of_their_life_ahead() {
        assert_eq!(retire_margin(Duration::from_secs(72 * 3600)), RETIRE_MARGIN);
        assert_eq!(retire_margin(Duration::from_secs(50)), RETIRE_MARGIN);
        assert_eq!(
            retire_margin(Duration::from_secs(3)),
            Duration::from_millis(300)
        );
        assert_eq!(retire_margin(Duration::ZERO), Duration::ZERO);
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem")
    }

    /// 1 January 3000 and 2999, 00:00 UTC, in Unix seconds.
    const Y3000: i64 = 32_503_680_000;
    const Y2999: i64 = Y3000 - 365 * 86_400;

    #[test]
    fn the_earliest_not_after_of_the_chain_counts() {
        let ca = TestCa::new("mesh");
        let uri = "spiffe://td.meshwork/ns/default/dc/dc1/svc/web";
        let leaf = der(&ca.leaf_between(uri, 2020, 3000).0);
        assert_eq!(peer_not_after(std::slice::from_ref(&leaf)), Some(Y3000));
        // The CA's own certificate expires later (rcgen's default, 4096):
        // the leaf's still counts...
        assert_eq!(peer_not_after(&[leaf.clone(), der(&ca.pem)]), Some(Y3000));
        // ...and a certificate further up that expires first wins.
        let sooner = der(&ca.leaf_between(uri, 2020, 2999).0);
        assert_eq!(peer_not_after(&[leaf, sooner]), Some(Y2999));
        assert!(peer_not_after(&[CertificateDer::from(vec![1, 2, 3])]).is_none());
        assert_eq!(peer_not_after(&[]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_are_now_once_passed() {
        let now = tokio::time::Instant::now();
        assert!(deadline(0) <= now + Duration::from_millis(1));
        let in_an_hour = crate::tls::leaf::now_unix() + 3600;
        let at = deadline(in_an_hour);
        assert!(at > now + Duration::from_secs(3598) && at <= now + Duration::from_secs(3600));
    }
}
