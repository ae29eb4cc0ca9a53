//! Reading `meshwork.v1.Watch` streams in the suites: the next event with
//! a time limit, and the next one that is not a heartbeat.

use std::time::Duration;

use anyhow::{Result, bail};
use meshwork_proto::v1::WatchEvent;
use meshwork_proto::v1::watch_event::Kind;
use tonic::Streaming;

/// The next event, within 10 s.
pub async fn next(stream: &mut Streaming<WatchEvent>) -> Result<WatchEvent> {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(event))) => Ok(event),
        Ok(Ok(None)) => bail!("stream ended"),
        Ok(Err(status)) => bail!("stream failed: {status}"),
        Err(_) => bail!("no event within 10 s"),
    }
}

/// The next event that is not a heartbeat (at most 100 heartbeats
/// skipped).
pub async fn next_change(stream: &mut Streaming<WatchEvent>) -> Result<WatchEvent> {
    for _ in 0..100 {
        let event = next(stream).await?;
        if event.kind != Kind::Heartbeat as i32 {
            return Ok(event);
        }
    }
    bail!("only heartbeats")
}
