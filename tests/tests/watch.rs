//! `meshwork.v1.Watch` against real servers: snapshot then changes, resume
//! on another server without a gap or a repeat, heartbeats, bad requests.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshwork_proto::v1::watch_client::WatchClient;
use meshwork_proto::v1::watch_event::Kind;
use meshwork_proto::v1::{
    Change, KvPrefixTopic, ServiceTopic, SubscribeRequest, WatchEvent, change, subscribe_request,
};
use meshwork_tests::Cluster;
use meshwork_tests::watch::{next, next_change};
use tonic::Streaming;

fn service_topic(name: &str, since_index: u64) -> SubscribeRequest {
    SubscribeRequest {
        topic: Some(subscribe_request::Topic::Service(ServiceTopic {
            name: name.into(),
            passing_only: false,
        })),
        since_index,
    }
}

async fn subscribe(url: String, request: SubscribeRequest) -> Result<Streaming<WatchEvent>> {
    let mut client = WatchClient::connect(url).await?;
    Ok(client.subscribe(request).await?.into_inner())
}

/// Reads the initial part of a stream up to END_OF_SNAPSHOT.
async fn initial(stream: &mut Streaming<WatchEvent>) -> Result<(Vec<WatchEvent>, WatchEvent)> {
    let mut before = Vec::new();
    for _ in 0..1000 {
        let event = next(stream).await?;
        if event.kind == Kind::EndOfSnapshot as i32 {
            return Ok((before, event));
        }
        before.push(event);
    }
    bail!("no END_OF_SNAPSHOT")
}

fn endpoint_keys(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match &c.change {
            Some(change::Change::Endpoint(e)) => format!("+{}", e.key),
            Some(change::Change::EndpointRemoved(k)) => format!("-{k}"),
            other => format!("?{other:?}"),
        })
        .collect()
}

async fn register(cluster: &Cluster, i: usize, node: &str, id: &str) -> Result<()> {
    let body = serde_json::json!({
        "Node": node,
        "Address": "10.1.0.1",
        "Service": {"Service": "web", "ID": id, "Port": 8080, "Tags": ["v1"]},
    });
    let resp = cluster
        .http
        .put(format!("{}/v1/catalog/register", cluster.servers[i].http()))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("register {id}: {}", resp.text().await?);
    }
    Ok(())
}

async fn deregister(cluster: &Cluster, i: usize, node: &str, id: &str) -> Result<()> {
    let body = serde_json::json!({"Node": node, "ServiceID": id});
    let resp = cluster
        .http
        .put(format!(
            "{}/v1/catalog/deregister",
            cluster.servers[i].http()
        ))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("deregister {id}: {}", resp.text().await?);
    }
    Ok(())
}

#[tokio::test]
async fn service_watch_streams_changes_and_resumes_elsewhere_without_gaps_or_repeats() -> Result<()>
{
    let cluster = Cluster::start(3, &["--watch-heartbeat-ms", "300"]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let follower = cluster.followers(leader)[0];
    let other = cluster.followers(leader)[1];

    // A fresh stream: an empty snapshot that resets the client, then the marker.
    let mut stream = subscribe(cluster.servers[follower].grpc(), service_topic("web", 0)).await?;
    let (snapshot, end) = initial(&mut stream).await?;
    assert_eq!(snapshot.len(), 1, "{snapshot:?}");
    assert!(snapshot[0].reset && snapshot[0].changes.is_empty());
    assert!(!end.resumed);

    // A registration shows up as one CHANGE.
    let written = Instant::now();
    register(&cluster, leader, "n1", "web-1").await?;
    let event = next_change(&mut stream).await?;
    eprintln!(
        "watch saw the registration {:?} after the write was sent",
        written.elapsed()
    );
    assert_eq!(event.kind, Kind::Change as i32);
    assert_eq!(endpoint_keys(&event.changes), ["+n1/web-1"]);
    assert!(event.index > end.index);
    let seen = event.index;
    drop(stream);

    // While disconnected: one new instance, one gone.
    register(&cluster, leader, "n2", "web-2").await?;
    deregister(&cluster, leader, "n1", "web-1").await?;

    // Resume on another server: exactly what was missed, then the marker.
    let mut stream = subscribe(cluster.servers[other].grpc(), service_topic("web", seen)).await?;
    let (missed, end) = initial(&mut stream).await?;
    assert!(end.resumed, "resumed from history");
    // A follower may not have applied the last write yet: then the rest
    // comes as a live change right after.
    let mut changes: Vec<WatchEvent> = missed;
    for e in &changes {
        assert_eq!(e.kind, Kind::Change as i32);
    }
    while changes.iter().map(|e| e.changes.len()).sum::<usize>() < 2 {
        changes.push(next_change(&mut stream).await?);
    }
    let keys: Vec<String> = changes
        .iter()
        .flat_map(|e| endpoint_keys(&e.changes))
        .collect();
    assert_eq!(keys, ["+n2/web-2", "-n1/web-1"], "no gap, no repeat");
    let mut last = seen;
    for e in &changes {
        assert!(e.index > last, "indexes only grow");
        last = e.index;
    }

    // Idle: heartbeats, never going back.
    let heartbeat = next(&mut stream).await?;
    assert_eq!(heartbeat.kind, Kind::Heartbeat as i32);
    assert!(heartbeat.index >= end.index);

    // Live again.
    register(&cluster, follower, "n3", "web-3").await?;
    let event = next_change(&mut stream).await?;
    assert_eq!(endpoint_keys(&event.changes), ["+n3/web-3"]);
    assert!(event.index > heartbeat.index.max(last));

    // Resume on the first server, whose feed for `web` kept its history.
    let seen = event.index;
    drop(stream);
    deregister(&cluster, leader, "n2", "web-2").await?;
    let mut stream =
        subscribe(cluster.servers[follower].grpc(), service_topic("web", seen)).await?;
    let (mut missed, end) = initial(&mut stream).await?;
    assert!(end.resumed);
    if missed.is_empty() {
        // Not applied on this follower yet: it comes live.
        missed.push(next_change(&mut stream).await?);
    }
    let keys: Vec<String> = missed
        .iter()
        .flat_map(|e| endpoint_keys(&e.changes))
        .collect();
    assert_eq!(keys, ["-n2/web-2"]);
    drop(stream);

    // A new client gets a fresh snapshot of what is there now.
    let mut fresh = subscribe(cluster.servers[leader].grpc(), service_topic("web", 0)).await?;
    let (snapshot, end) = initial(&mut fresh).await?;
    assert!(!end.resumed && snapshot[0].reset);
    let keys: Vec<String> = snapshot
        .iter()
        .flat_map(|e| endpoint_keys(&e.changes))
        .collect();
    assert_eq!(keys, ["+n3/web-3"]);
    cluster.done();
    Ok(())
}

#[tokio::test]
async fn kv_prefix_watch_and_bad_requests() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &["--watch-heartbeat-ms", "200"]).await?;
    cluster.wait_leader(Duration::from_secs(10)).await?;
    let url = cluster.servers[0].grpc();
    cluster.must_put(0, "app/a", "1").await?;

    let request = SubscribeRequest {
        topic: Some(subscribe_request::Topic::KvPrefix(KvPrefixTopic {
            prefix: "app/".into(),
        })),
        since_index: 0,
    };
    let mut stream = subscribe(url.clone(), request).await?;
    let (snapshot, _) = initial(&mut stream).await?;
    assert!(matches!(
        &snapshot[0].changes[0].change,
        Some(change::Change::Kv(e)) if e.key == "app/a" && e.value == b"1"
    ));
    // A key outside the prefix is not a change of the topic.
    cluster.must_put(0, "other", "x").await?;
    cluster.must_put(0, "app/b", "2").await?;
    let event = next_change(&mut stream).await?;
    assert!(matches!(
        &event.changes[..],
        [Change { change: Some(change::Change::Kv(e)) }] if e.key == "app/b"
    ));
    let resp = cluster
        .http
        .delete(format!("{}/v1/kv/app/a", cluster.servers[0].http()))
        .send()
        .await?;
    assert!(resp.status().is_success());
    let event = next_change(&mut stream).await?;
    assert!(matches!(
        &event.changes[..],
        [Change { change: Some(change::Change::KvRemoved(k)) }] if k == "app/a"
    ));

    // Bad requests get INVALID_ARGUMENT; an index from the future UNAVAILABLE.
    let mut client = WatchClient::connect(url).await?;
    let status = client
        .subscribe(SubscribeRequest::default())
        .await
        .err()
        .context("no topic accepted")?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    let status = client
        .subscribe(service_topic("", 0))
        .await
        .err()
        .context("empty service name accepted")?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    let status = client
        .subscribe(service_topic("web", u64::MAX / 2))
        .await
        .err()
        .context("future index accepted")?;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    cluster.done();
    Ok(())
}

/// The sidecar's discovery module: the endpoint set follows the registry,
/// and keeps following when the server it streams from is killed.
#[tokio::test]
async fn sidecar_discovery_follows_a_service_across_a_server_loss() -> Result<()> {
    use meshwork_sidecar::discovery::Discovery;

    let mut cluster = Cluster::start(3, &["--watch-heartbeat-ms", "300"]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let follower = cluster.followers(leader)[0];
    // The first address is the one it streams from until that fails.
    let mut addresses = vec![format!(
        "{}:{}",
        cluster.servers[follower].ip,
        meshwork_tests::GRPC_PORT
    )];
    addresses.extend(
        (0..3)
            .filter(|i| *i != follower)
            .map(|i| format!("{}:{}", cluster.servers[i].ip, meshwork_tests::GRPC_PORT)),
    );
    let shutdown = tokio_util_free_token();
    let discovery = Discovery::new(
        addresses,
        meshwork_sidecar::RegistryAccess::default(),
        shutdown.clone(),
    );
    let mut web = discovery.service("web", false);

    async fn keys_when(
        rx: &mut meshwork_sidecar::discovery::Endpoints,
        want: &[&str],
    ) -> Result<()> {
        let want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        let waited = tokio::time::timeout(
            Duration::from_secs(15),
            rx.wait_for(|set| set.ready && set.value.keys().cloned().collect::<Vec<_>>() == want),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        match waited {
            true => Ok(()),
            false => bail!(
                "endpoints never became {want:?}: {:?}",
                rx.borrow().value.keys().collect::<Vec<_>>()
            ),
        }
    }

    keys_when(&mut web, &[]).await?;
    register(&cluster, leader, "n1", "web-1").await?;
    keys_when(&mut web, &["n1/web-1"]).await?;
    register(&cluster, leader, "n2", "web-2").await?;
    keys_when(&mut web, &["n1/web-1", "n2/web-2"]).await?;

    // Kill the server it streams from; a change made meanwhile still arrives.
    cluster.servers[follower].kill().await?;
    deregister(&cluster, leader, "n1", "web-1").await?;
    keys_when(&mut web, &["n2/web-2"]).await?;
    register(&cluster, leader, "n3", "web-3").await?;
    keys_when(&mut web, &["n2/web-2", "n3/web-3"]).await?;
    shutdown.cancel();
    cluster.done();
    Ok(())
}

fn tokio_util_free_token() -> meshwork_sidecar::discovery::ShutdownToken {
    meshwork_sidecar::discovery::ShutdownToken::new()
}

/// SIGTERM ends open watch streams instead of waiting for them forever.
#[tokio::test]
async fn a_server_with_open_watch_streams_stops_promptly() -> Result<()> {
    let mut cluster = Cluster::start(1, &[]).await?;
    cluster.wait_leader(Duration::from_secs(10)).await?;
    let mut stream = subscribe(cluster.servers[0].grpc(), service_topic("web", 0)).await?;
    initial(&mut stream).await?;
    let started = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(20), cluster.servers[0].stop()).await;
    let status = stopped.context("the server did not stop within 20 s")??;
    assert!(status.success(), "exit {status:?}");
    // Well inside the 5 s grace the server gives stragglers.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stopped after {:?}",
        started.elapsed()
    );
    // The client sees its stream end with UNAVAILABLE (and would
    // resubscribe elsewhere).
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
    assert!(
        matches!(&end, Ok(Err(status)) if status.code() == tonic::Code::Unavailable),
        "the stream ended with UNAVAILABLE: {end:?}"
    );
    cluster.done();
    Ok(())
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_is_cut_off_and_catches_up_by_resubscribing() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &[]).await?;
    cluster.wait_leader(Duration::from_secs(10)).await?;
    let url = cluster.servers[0].grpc();
    let request = |since_index| SubscribeRequest {
        topic: Some(subscribe_request::Topic::KvPrefix(KvPrefixTopic {
            prefix: "lag/".into(),
        })),
        since_index,
    };
    // A small HTTP/2 window (hyper's default is 2 MiB), so that the server
    // cannot send ahead much of what the subscriber does not read.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())?
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await?;
    let mut stream = WatchClient::new(channel)
        .subscribe(request(0))
        .await?
        .into_inner();
    let (_, end) = initial(&mut stream).await?;
    let mut last = end.index;
    // The subscriber reads nothing while more changes than the server
    // keeps queued for it (1,024) are written; the values are large enough
    // that what HTTP/2 buffers per stream (hyper: 400 KiB) holds only a
    // hundred of them.
    // 1,400 writes leave room for a few hundred of them to reach the
    // subscriber folded into one event (the hub folds what arrives while it
    // is busy) and still overflow its queue.
    let value = "v".repeat(4000);
    const WRITES: usize = 1400;
    for i in 0..WRITES {
        cluster.must_put(0, &format!("lag/{i:04}"), &value).await?;
    }
    // What was sent before the cut-off arrives, then RESOURCE_EXHAUSTED.
    let mut keys = std::collections::BTreeSet::new();
    let apply = |event: &WatchEvent, keys: &mut std::collections::BTreeSet<String>| {
        for c in &event.changes {
            match &c.change {
                Some(change::Change::Kv(e)) => {
                    keys.insert(e.key.clone());
                }
                Some(change::Change::KvRemoved(k)) => {
                    keys.remove(k);
                }
                _ => {}
            }
        }
    };
    let mut cut = None;
    for _ in 0..WRITES + 10 {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(event))) => {
                assert!(event.index >= last, "index went back");
                last = last.max(event.index);
                apply(&event, &mut keys);
            }
            Ok(Err(status)) => {
                cut = Some(status);
                break;
            }
            other => bail!("expected events then RESOURCE_EXHAUSTED, got {other:?}"),
        }
    }
    let status = cut.context("the lagging subscriber was not cut off")?;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("since_index"),
        "the status says how to resume: {status}"
    );
    assert!(keys.len() < WRITES, "it was cut off before the end");
    // Resubscribing from the last index seen: what was missed if the
    // server still has it, else a fresh snapshot (flagged: not `resumed`,
    // first event `reset`).
    let mut stream = subscribe(url, request(last)).await?;
    let (missed, end) = initial(&mut stream).await?;
    if !end.resumed {
        assert!(missed.first().is_some_and(|e| e.reset), "a snapshot resets");
        keys.clear();
    }
    for event in &missed {
        apply(event, &mut keys);
    }
    assert!(end.index >= last, "no index regression on resubscribing");
    assert_eq!(keys.len(), WRITES, "every key after resubscribing");
    cluster.done();
    Ok(())
}
