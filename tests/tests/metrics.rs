//! `/metrics` and `/v1/agent/metrics` on a real server: Raft gauges,
//! requests by route and status, parked blocking queries, DNS answers.

use std::time::Duration;

use anyhow::Result;
use meshwork_tests::Cluster;

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn prometheus_text_and_consul_json() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &[]).await?;
    cluster.wait_leader(Duration::from_secs(10)).await?;
    let base = cluster.servers[0].http();
    cluster.must_put(0, "app/a", "1").await?;
    cluster.get_raw(0, "app/a", "").await?;

    // A blocking query that stays parked while we look.
    let parked = {
        let http = cluster.http.clone();
        let url = format!("{base}/v1/kv/app/a?index=1000000&wait=5s");
        tokio::spawn(async move { http.get(url).send().await })
    };
    // One gRPC call that succeeds and one the server refuses.
    let mut registry =
        meshwork_proto::v1::registry_client::RegistryClient::connect(cluster.servers[0].grpc())
            .await?;
    registry
        .status(meshwork_proto::v1::StatusRequest {})
        .await?;
    let mut agent =
        meshwork_proto::v1::agent_client::AgentClient::connect(cluster.servers[0].grpc()).await?;
    let refused = agent
        .update_check(meshwork_proto::v1::UpdateCheckRequest::default())
        .await;
    let refused_code = match refused {
        Ok(reply) => panic!("an empty UpdateCheck was accepted: {reply:?}"),
        Err(status) => status.code(),
    };
    let dig = tokio::process::Command::new("dig")
        .arg(format!("@{}", cluster.servers[0].ip))
        .args(["-p", "28600", "+time=3", "+tries=1", "nosuch.service.mesh"])
        .output()
        .await?;
    assert!(dig.status.success());

    let mut text = String::new();
    for _ in 0..50 {
        text = cluster
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        if value(&text, "meshwork_blocking_queries") == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        value(&text, "meshwork_blocking_queries"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value(&text, "meshwork_raft_is_leader"), Some(1.0), "{text}");
    assert!(
        value(&text, "meshwork_raft_term").is_some_and(|t| t >= 1.0),
        "{text}"
    );
    assert!(
        value(&text, "meshwork_raft_applied_index").is_some_and(|i| i >= 2.0),
        "{text}"
    );
    assert_eq!(value(&text, "meshwork_kv_keys"), Some(1.0), "{text}");
    let put = r#"meshwork_http_request_duration_seconds_count{route="/v1/kv/{*key}",method="PUT",status="200"}"#;
    assert_eq!(value(&text, put), Some(1.0), "{text}");
    let status_ok = r#"meshwork_grpc_request_duration_seconds_count{method="/meshwork.v1.Registry/Status",code="OK"}"#;
    assert_eq!(value(&text, status_ok), Some(1.0), "{text}");
    let code_name = format!("{refused_code:?}")
        .chars()
        .flat_map(|c| {
            let upper = c.is_uppercase();
            [
                if upper { Some('_') } else { None },
                Some(c.to_ascii_uppercase()),
            ]
        })
        .flatten()
        .collect::<String>();
    let refused = format!(
        r#"meshwork_grpc_request_duration_seconds_count{{method="/meshwork.v1.Agent/UpdateCheck",code="{}"}}"#,
        code_name.trim_start_matches('_')
    );
    assert_eq!(value(&text, &refused), Some(1.0), "{refused}\n{text}");
    for series in [
        "meshwork_raft_append_duration_seconds_count",
        "meshwork_raft_apply_duration_seconds_count",
    ] {
        assert!(
            value(&text, series).is_some_and(|n| n >= 1.0),
            "{series}\n{text}"
        );
    }
    let nx = r#"meshwork_dns_answers_total{qtype="A",rcode="NXDOMAIN"}"#;
    assert_eq!(value(&text, nx), Some(1.0), "{text}");

    let same = cluster
        .http
        .get(format!("{base}/v1/agent/metrics?format=prometheus"))
        .send()
        .await?
        .text()
        .await?;
    assert!(same.contains("# TYPE meshwork_raft_term gauge"));
    let json: serde_json::Value = cluster
        .http
        .get(format!("{base}/v1/agent/metrics"))
        .send()
        .await?
        .json()
        .await?;
    assert!(
        json["Gauges"]
            .as_array()
            .is_some_and(|g| g.iter().any(|m| m["Name"] == "meshwork_raft_term")),
        "{json}"
    );
    let bad = cluster
        .http
        .get(format!("{base}/v1/agent/metrics?format=xml"))
        .send()
        .await?;
    assert_eq!(bad.status().as_u16(), 400);
    parked.abort();
    cluster.done();
    Ok(())
}
