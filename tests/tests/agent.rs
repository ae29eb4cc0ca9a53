//! `meshwork.v1.Agent` against a real three-server cluster: a sidecar's
//! registration, checks, heartbeat session (renewed through followers),
//! expiry, removal, the safety valve and bad requests.

use std::time::Duration;

use anyhow::Result;
use meshwork_proto::v1::agent_client::AgentClient;
use meshwork_proto::v1::{
    AgentCheck, AgentService, CheckStatus, DeregisterRequest, HeartbeatRequest, RegisterRequest,
    UpdateCheckRequest,
};
use meshwork_tests::Cluster;
use tonic::transport::Channel;

fn registration(node: &str, id: &str, ttl_ms: u64, deregister_after_ms: u64) -> RegisterRequest {
    RegisterRequest {
        node: node.into(),
        node_address: "10.2.0.1".into(),
        service: Some(AgentService {
            id: id.into(),
            name: "api".into(),
            port: 9090,
            tags: vec!["v2".into()],
            ..Default::default()
        }),
        checks: vec![AgentCheck {
            check_id: format!("{id}:http"),
            status: CheckStatus::CheckPassing as i32,
            target: "http://127.0.0.1:9090/health".into(),
            interval_ms: 1000,
            ..Default::default()
        }],
        session_ttl_ms: ttl_ms,
        deregister_critical_after_ms: deregister_after_ms,
        ..Default::default()
    }
}

async fn heartbeat_for(client: &mut AgentClient<Channel>, node: &str, id: &str, d: Duration) {
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end {
        let _ = client
            .heartbeat(HeartbeatRequest {
                node: node.into(),
                service_id: id.into(),
            })
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn sidecar_session_lifecycle_through_followers() -> Result<()> {
    let cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    let followers = cluster.followers(leader);
    let mut via_follower = AgentClient::connect(cluster.servers[followers[0]].grpc()).await?;
    let mut via_other = AgentClient::connect(cluster.servers[followers[1]].grpc()).await?;

    let reply = via_follower
        .register(registration("app-host-1", "api-1", 2000, 2500))
        .await?
        .into_inner();
    assert_eq!(reply.session_ttl_ms, 2000);
    for i in 0..3 {
        cluster
            .wait_instance_health(i, "api", &[("api-1", "passing")], Duration::from_secs(10))
            .await?;
    }

    // Heartbeats through the other follower keep it alive past the TTL.
    heartbeat_for(
        &mut via_other,
        "app-host-1",
        "api-1",
        Duration::from_secs(4),
    )
    .await;
    assert_eq!(
        cluster.instance_health(leader, "api").await?,
        [("api-1".to_owned(), "passing".to_owned())]
    );

    // Silence: critical within the TTL (plus the leader's 250 ms tick)...
    cluster
        .wait_instance_health(
            leader,
            "api",
            &[("api-1", "critical")],
            Duration::from_secs(10),
        )
        .await?;
    // ...renewed: passing again.
    heartbeat_for(
        &mut via_other,
        "app-host-1",
        "api-1",
        Duration::from_millis(800),
    )
    .await;
    cluster
        .wait_instance_health(
            leader,
            "api",
            &[("api-1", "passing")],
            Duration::from_secs(10),
        )
        .await?;
    // Silent for good: critical, then removed after deregister_critical_after.
    cluster
        .wait_instance_health(
            leader,
            "api",
            &[("api-1", "critical")],
            Duration::from_secs(10),
        )
        .await?;
    // Gone on every server (the heartbeat below is answered from the
    // follower's own state, which may trail the leader's by an entry).
    for i in 0..3 {
        cluster
            .wait_instance_health(i, "api", &[], Duration::from_secs(10))
            .await?;
    }
    let reply = via_other
        .heartbeat(HeartbeatRequest {
            node: "app-host-1".into(),
            service_id: "api-1".into(),
        })
        .await?
        .into_inner();
    assert!(!reply.registered, "the sidecar is told to register again");

    // Check updates and deregistration.
    via_follower
        .register(registration("app-host-2", "api-2", 60_000, 0))
        .await?;
    cluster
        .wait_instance_health(
            leader,
            "api",
            &[("api-2", "passing")],
            Duration::from_secs(10),
        )
        .await?;
    via_other
        .update_check(UpdateCheckRequest {
            node: "app-host-2".into(),
            check_id: "api-2:http".into(),
            status: CheckStatus::CheckCritical as i32,
            output: "HTTP 503".into(),
        })
        .await?;
    cluster
        .wait_instance_health(
            leader,
            "api",
            &[("api-2", "critical")],
            Duration::from_secs(10),
        )
        .await?;
    via_other
        .deregister(DeregisterRequest {
            node: "app-host-2".into(),
            service_id: "api-2".into(),
        })
        .await?;
    cluster
        .wait_instance_health(leader, "api", &[], Duration::from_secs(10))
        .await?;
    let nodes: serde_json::Value = cluster
        .http
        .get(format!(
            "{}/v1/catalog/nodes",
            cluster.servers[leader].http()
        ))
        .send()
        .await?
        .json()
        .await?;
    assert!(
        !nodes.to_string().contains("app-host-2"),
        "the sidecar's node went with its last service: {nodes}"
    );
    cluster.done();
    Ok(())
}

#[tokio::test]
async fn mass_silence_trips_the_safety_valve_and_bad_requests_are_refused() -> Result<()> {
    let cluster = Cluster::start(1, &[]).await?;
    cluster.wait_leader(Duration::from_secs(10)).await?;
    let mut client = AgentClient::connect(cluster.servers[0].grpc()).await?;
    let mut want = Vec::new();
    for n in 1..=4 {
        client
            .register(registration(
                &format!("host-{n}"),
                &format!("api-{n}"),
                3000,
                0,
            ))
            .await?;
        want.push((format!("api-{n}"), "passing"));
        // Staggered within a third of the TTL, as real sidecars' renewals
        // are: their expiries come in different sweeps (every 250 ms), one
        // or two at a time, and the valve must still see them together.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let want: Vec<(&str, &str)> = want.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    cluster
        .wait_instance_health(0, "api", &want, Duration::from_secs(10))
        .await?;
    // All four go silent together: more than 40 % of the sessions, so the
    // leader holds the expiry and says why.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    cluster
        .wait_instance_health(0, "api", &want, Duration::from_secs(10))
        .await?;
    assert!(
        cluster.servers[0].log_tail(200).contains("safety valve"),
        "{}",
        cluster.logs()
    );

    // Registering again with other checks drops the ones no longer declared.
    let mut changed = registration("host-1", "api-1", 1000, 0);
    changed.checks[0].check_id = "api-1:tcp".into();
    client.register(changed).await?;
    let checks = cluster
        .http
        .get(format!(
            "{}/v1/health/node/host-1",
            cluster.servers[0].http()
        ))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        checks.contains("api-1:tcp") && !checks.contains("api-1:http"),
        "{checks}"
    );

    let mut bad = registration("h", "x", 1000, 0);
    bad.service = None;
    let status = client.register(bad).await.err();
    assert_eq!(status.map(|s| s.code()), Some(tonic::Code::InvalidArgument));
    let mut bad = registration("h", "x", 1000, 0);
    if let Some(s) = bad.service.as_mut() {
        s.port = 70_000;
    }
    let status = client.register(bad).await.err();
    assert_eq!(status.map(|s| s.code()), Some(tonic::Code::InvalidArgument));
    let status = client.register(registration("h", "x", 10, 0)).await.err();
    assert_eq!(status.map(|s| s.code()), Some(tonic::Code::InvalidArgument));
    let status = client
        .update_check(UpdateCheckRequest {
            node: "host-1".into(),
            check_id: "no-such-check".into(),
            status: CheckStatus::CheckPassing as i32,
            output: String::new(),
        })
        .await
        .err();
    assert_eq!(status.map(|s| s.code()), Some(tonic::Code::NotFound));
    let status = client
        .update_check(UpdateCheckRequest {
            node: "host-1".into(),
            check_id: "api-1:http".into(),
            status: 42,
            output: String::new(),
        })
        .await
        .err();
    assert_eq!(status.map(|s| s.code()), Some(tonic::Code::InvalidArgument));
    let reply = client
        .heartbeat(HeartbeatRequest {
            node: "never-registered".into(),
            service_id: "nope".into(),
        })
        .await?
        .into_inner();
    assert!(!reply.registered);
    cluster.done();
    Ok(())
}
