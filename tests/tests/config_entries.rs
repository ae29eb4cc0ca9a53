//! Config entries (`/v1/config`, Consul's shapes) on a three-server
//! cluster: write through any server, read everywhere, check-and-set,
//! bad entries refused, blocking lists, and the `config_entries` watch
//! topic.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshwork_proto::v1::watch_client::WatchClient;
use meshwork_proto::v1::watch_event::Kind;
use meshwork_proto::v1::{ConfigEntriesTopic, SubscribeRequest, change, subscribe_request};
use meshwork_tests::Cluster;
use meshwork_tests::watch::next_change;
use serde_json::{Value, json};

async fn put(cluster: &Cluster, i: usize, entry: &Value, query: &str) -> Result<(u16, String)> {
    let resp = cluster
        .http
        .put(format!("{}/v1/config{query}", cluster.servers[i].http()))
        .json(entry)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

async fn get(cluster: &Cluster, i: usize, path: &str) -> Result<(u16, Value, u64)> {
    let resp = cluster
        .http
        .get(format!("{}/v1/config/{path}", cluster.servers[i].http()))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let index = resp
        .headers()
        .get("x-consul-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let text = resp.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, body, index))
}

#[tokio::test]
async fn config_entries_replicate_with_consul_semantics() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    let follower = cluster.followers(leader)[0];

    // Written through a follower, read through the leader.
    let web = json!({"Kind": "service-defaults", "Name": "web", "protocol": "http", "Meta": {"team": "a"}});
    assert_eq!(
        put(&cluster, follower, &web, "").await?,
        (200, "true".into())
    );
    let (status, entry, _) = get(&cluster, leader, "service-defaults/web").await?;
    assert_eq!(status, 200, "{entry}");
    assert_eq!(
        entry["Protocol"], "http",
        "field names spelled as Consul: {entry}"
    );
    assert_eq!(entry["Meta"]["team"], "a");
    let modify = entry["ModifyIndex"].as_u64().context("ModifyIndex")?;
    assert_eq!(entry["CreateIndex"].as_u64(), Some(modify));

    // Check-and-set.
    let grpc = json!({"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"});
    assert_eq!(
        put(&cluster, leader, &grpc, "?cas=0").await?,
        (200, "false".into())
    );
    assert_eq!(
        put(&cluster, leader, &grpc, &format!("?cas={modify}")).await?,
        (200, "true".into())
    );
    let (_, list, list_index) = get(&cluster, follower, "service-defaults").await?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["Protocol"], "grpc");

    // Bad entries: a clear 400, nothing stored.
    for (bad, why) in [
        (
            json!({"Kind": "service-defaults", "Name": "web", "Protocl": "http"}),
            "unknown field",
        ),
        (
            json!({"Kind": "no-such-kind", "Name": "x"}),
            "invalid config entry kind",
        ),
        (json!({"Kind": "proxy-defaults", "Name": "web"}), "global"),
        (json!({"Kind": "service-defaults"}), "missing Name"),
        (
            json!({"Kind": "service-router", "Name": "web", "Routes": "all"}),
            "a list",
        ),
    ] {
        let (status, message) = put(&cluster, leader, &bad, "").await?;
        assert_eq!(status, 400, "{bad}: {message}");
        assert!(message.contains(why), "{bad}: {message}");
    }
    let resp = cluster
        .http
        .put(format!("{}/v1/config", cluster.servers[leader].http()))
        .body("{not json")
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 400);
    let (status, _, _) = get(&cluster, leader, "no-such-kind").await?;
    assert_eq!(status, 400);
    let (status, body, _) = get(&cluster, leader, "service-defaults/nope").await?;
    assert_eq!(status, 404, "{body}");

    // A blocking list of service-router wakes on a router write.
    let blocking = {
        let url = format!(
            "{}/v1/config/service-router?index={list_index}&wait=20s",
            cluster.servers[follower].http()
        );
        let http = cluster.http.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let resp = http.get(url).send().await?;
            let body: Value = resp.json().await?;
            anyhow::Ok((started.elapsed(), body))
        })
    };

    // The watch topic: snapshot (empty), then the router, then its removal.
    let mut client = WatchClient::connect(cluster.servers[follower].grpc()).await?;
    let mut stream = client
        .subscribe(SubscribeRequest {
            topic: Some(subscribe_request::Topic::ConfigEntries(
                ConfigEntriesTopic {
                    kind: "service-router".into(),
                },
            )),
            since_index: 0,
        })
        .await?
        .into_inner();
    for _ in 0..10 {
        let event = next_change(&mut stream).await?;
        if event.kind == Kind::EndOfSnapshot as i32 {
            break;
        }
        assert!(event.changes.is_empty(), "no routers yet: {event:?}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let router = json!({
        "Kind": "service-router", "Name": "web",
        "Routes": [{"Match": {"HTTP": {"PathPrefix": "/admin"}}, "Destination": {"Service": "admin"}}]
    });
    assert_eq!(
        put(&cluster, leader, &router, "").await?,
        (200, "true".into())
    );
    let event = next_change(&mut stream).await?;
    let entry = match event.changes.as_slice() {
        [c] => match &c.change {
            Some(change::Change::ConfigEntry(e)) => e.clone(),
            other => bail!("not a config entry: {other:?}"),
        },
        other => bail!("one change expected: {other:?}"),
    };
    assert_eq!(
        (entry.kind.as_str(), entry.name.as_str()),
        ("service-router", "web")
    );
    let json: Value = serde_json::from_str(&entry.json)?;
    assert_eq!(json["Routes"][0]["Destination"]["Service"], "admin");
    assert_eq!(event.index, entry.modify_index);

    let (elapsed, body) = blocking.await??;
    assert!(
        elapsed < Duration::from_secs(15),
        "the blocking list was not woken"
    );
    assert_eq!(body[0]["Name"], "web", "{body}");

    // Delete with a wrong cas: false; without cas: {} (as Consul).
    let url = format!(
        "{}/v1/config/service-router/web",
        cluster.servers[follower].http()
    );
    let resp = cluster.http.delete(format!("{url}?cas=1")).send().await?;
    assert_eq!(resp.text().await?.trim(), "false");
    let resp = cluster.http.delete(&url).send().await?;
    assert_eq!(resp.text().await?.trim(), "{}");
    let event = next_change(&mut stream).await?;
    assert!(
        matches!(event.changes.as_slice(), [c] if c.change == Some(change::Change::ConfigEntryRemoved("web".into()))),
        "{event:?}"
    );
    let (status, _, _) = get(&cluster, leader, "service-router/web").await?;
    assert_eq!(status, 404);

    // A watch on an unknown kind is refused.
    let refused = client
        .subscribe(SubscribeRequest {
            topic: Some(subscribe_request::Topic::ConfigEntries(
                ConfigEntriesTopic {
                    kind: "nope".into(),
                },
            )),
            since_index: 0,
        })
        .await;
    match refused {
        Ok(_) => bail!("a watch on an unknown kind was accepted"),
        Err(status) => assert_eq!(status.code(), tonic::Code::InvalidArgument),
    }
    cluster.done();
    Ok(())
}

/// Routers, splitters and resolvers are refused at `PUT` when the chain of
/// the service they name would not compile (the sidecars compile it with
/// the same code), with the entry and field named; a chain that compiles
/// is stored.
#[tokio::test]
async fn discovery_chain_entries_that_cannot_apply_are_refused_at_put() -> Result<()> {
    let cluster = Cluster::start(1, &[]).await?;
    cluster.wait_leader(Duration::from_secs(20)).await?;
    let resolver = json!({
        "Kind": "service-resolver", "Name": "api",
        "DefaultSubset": "v1",
        "Subsets": {
            "v1": {"Filter": "Service.Meta.version == v1"},
            "v2": {"Filter": "Service.Meta.version == v2"}
        }
    });
    assert_eq!(put(&cluster, 0, &resolver, "").await?, (200, "true".into()));
    for (entry, says) in [
        (
            json!({"Kind": "service-resolver", "Name": "db", "DefaultSubset": "a",
                   "Subsets": {"a": {"Filter": "Service.Meta.version = v1"}}}),
            "Subsets.a.Filter: filter \"Service.Meta.version = v1\": expected == or !=",
        ),
        (
            json!({"Kind": "service-splitter", "Name": "api",
                   "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 5, "ServiceSubset": "v2"}]}),
            "the weights add up to 95, not 100",
        ),
        (
            json!({"Kind": "service-splitter", "Name": "api",
                   "Splits": [{"Weight": 100, "ServiceSubset": "v3"}]}),
            "no subset \"v3\"",
        ),
        (
            json!({"Kind": "service-router", "Name": "api",
                   "Routes": [{"Match": {"HTTP": {"PathRegex": "(unclosed"}}}]}),
            "PathRegex",
        ),
        (
            json!({"Kind": "service-resolver", "Name": "api", "Redirect": {"Service": "api"}}),
            "redirects \"api\" to itself",
        ),
    ] {
        let (status, text) = put(&cluster, 0, &entry, "").await?;
        assert_eq!(status, 400, "{entry}: {text}");
        assert!(text.contains(says), "{entry}: {text}");
    }
    let splitter = json!({"Kind": "service-splitter", "Name": "api",
        "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]});
    assert_eq!(put(&cluster, 0, &splitter, "").await?, (200, "true".into()));
    let (status, _, _) = get(&cluster, 0, "service-splitter/api").await?;
    assert_eq!(status, 200);
    let (status, body, _) = get(&cluster, 0, "service-resolver/db").await?;
    assert_eq!(status, 404, "the refused resolver was not stored: {body}");
    Ok(())
}
