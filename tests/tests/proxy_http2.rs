//! The sidecar's data plane end to end, HTTP/2 and gRPC: server streaming
//! with a status in the trailers, the proxy's own errors as gRPC statuses,
//! and HTTP/2 bodies streamed or kept for retries, with trailers. Through
//! real `meshwork-registry` and `meshwork-sidecar` processes and demo
//! backends (hyper and tonic servers). Traffic goes app → client sidecar
//! (outbound listener) → server sidecar (inbound listener) → backend, as in
//! production.
//!
//! Every address is on the cluster's own `127.x.y.0/24`; every loop is
//! bounded in count and time. The harness (the mesh, its sidecars, the demo
//! backends and the clients) is in `meshwork_tests::{sidecar, apps, http}`.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use meshwork_tests::apps::{grpc_backend, http_backend};
use meshwork_tests::http::{CHUNK, Trailed, h2_client};
use meshwork_tests::sidecar::{Mesh, Service, UPSTREAM_PORT};

#[tokio::test]
async fn http2_and_grpc_streaming_with_trailers() -> Result<()> {
    use meshwork_proto::v1::watch_client::WatchClient;
    use meshwork_proto::v1::{ServiceTopic, SubscribeRequest, subscribe_request};

    let mut mesh = Mesh::start().await?;
    // gRPC: client sidecar (grpc) -> server sidecar (grpc) -> tonic.
    let ip = mesh.ip(20);
    let app = grpc_backend(&ip).await?;
    mesh.server_sidecar(
        &ip,
        Service {
            name: "streamer",
            id: "streamer-1",
            app,
            protocol: "grpc",
        },
    )
    .await?;
    let client_ip = mesh.ip(100);
    let c = mesh
        .client_sidecar(&client_ip, "name = \"streamer\"\nprotocol = \"grpc\"")
        .await?;
    mesh.sidecars[c].wait_endpoints(1).await?;
    let mut client = WatchClient::connect(format!("http://{client_ip}:{UPSTREAM_PORT}")).await?;
    let request = |name: &str| SubscribeRequest {
        topic: Some(subscribe_request::Topic::Service(ServiceTopic {
            name: name.to_owned(),
            passing_only: false,
        })),
        since_index: 0,
    };
    let mut stream = client.subscribe(request("ok")).await?.into_inner();
    let mut indexes = Vec::new();
    for _ in 0..10 {
        match stream.message().await? {
            Some(e) => indexes.push(e.index),
            None => break,
        }
    }
    ensure!(indexes == vec![1, 2, 3], "{indexes:?}");
    // A status in the trailers after a message arrives as such.
    let mut stream = client.subscribe(request("fail")).await?.into_inner();
    let first = stream.message().await?;
    ensure!(first.map(|e| e.index) == Some(1));
    match stream.message().await {
        Err(status) => ensure!(status.code() == tonic::Code::NotFound, "{status:?}"),
        Ok(m) => bail!("expected NOT_FOUND in the trailers, got {m:?}"),
    }

    // An intention denying the caller: PERMISSION_DENIED, from the
    // destination's sidecar, before the app sees the call.
    let url = format!("{}/v1/config", mesh.cluster().servers[0].http());
    let written = meshwork_tests::http::http_client()?
        .put(url)
        .body(r#"{"Kind":"service-intentions","Name":"streamer","Sources":[{"Name":"client","Action":"deny"}]}"#)
        .send()
        .await?;
    ensure!(written.status() == 200);
    let denied = meshwork_tests::wait_for("the deny applied", Duration::from_secs(3), || {
        let mut client = client.clone();
        async move {
            match client.subscribe(request("ok")).await {
                Err(status) if status.code() == tonic::Code::PermissionDenied => Some(status),
                _ => None,
            }
        }
    })
    .await?;
    ensure!(denied.message().contains("intention"), "{denied:?}");

    // The proxy's own errors reach a gRPC caller as a gRPC status.
    let c3_ip = mesh.ip(102);
    mesh.client_sidecar(&c3_ip, "name = \"nobody\"\nprotocol = \"grpc\"")
        .await?;
    let mut nobody = WatchClient::connect(format!("http://{c3_ip}:{UPSTREAM_PORT}")).await?;
    match nobody.subscribe(request("ok")).await {
        Err(status) => {
            ensure!(status.code() == tonic::Code::Unavailable, "{status:?}");
            ensure!(
                status.message().contains("no healthy endpoint"),
                "{status:?}"
            );
        }
        Ok(_) => bail!("a stream from a service with no instances"),
    }

    // Plain HTTP/2 (prior knowledge) through an http2 upstream.
    let h2_ip = mesh.ip(21);
    let (h2_app, _) = http_backend(&h2_ip, "h2-echo").await?;
    mesh.server_sidecar(
        &h2_ip,
        Service {
            name: "h2echo",
            id: "h2echo-1",
            app: h2_app,
            protocol: "http2",
        },
    )
    .await?;
    let c2_ip = mesh.ip(101);
    let c2 = mesh
        // Retries on (the default, said here): small bodies with a length
        // are kept in memory for them (see the trailers case below).
        .client_sidecar(
            &c2_ip,
            "name = \"h2echo\"\nprotocol = \"http2\"\nretries = { attempts = 2 }",
        )
        .await?;
    mesh.sidecars[c2].wait_endpoints(1).await?;
    let h2 = h2_client::<Full<Bytes>>();
    for i in 0..20 {
        let req = Request::post(format!("http://{c2_ip}:{UPSTREAM_PORT}/x"))
            .body(Full::new(Bytes::from(format!("h2 {i}"))))?;
        let r = h2.request(req).await?;
        ensure!(r.status() == 200);
        ensure!(
            r.headers()["x-seen-version"] == "HTTP/2.0",
            "{:?}",
            r.headers()
        );
        let body = r.into_body().collect().await?.to_bytes();
        ensure!(body == format!("h2-echo h2 {i}").as_bytes());
    }
    // A streamed body (no length, so not buffered) larger than the HTTP/2
    // windows, ending in trailers: piped upstream as the windows open.
    let h2 = h2_client::<Trailed>();
    let req = Request::post(format!("http://{c2_ip}:{UPSTREAM_PORT}/big")).body(Trailed {
        chunk: CHUNK,
        left: 49,
    })?;
    let r = tokio::time::timeout(Duration::from_secs(30), h2.request(req)).await??;
    ensure!(r.status() == 200, "{}", r.status());
    let r_trailers = r
        .headers()
        .get("x-seen-trailers")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = r.into_body().collect().await?.to_bytes();
    let expected = "h2-echo ".len() + 48 * CHUNK.len();
    ensure!(
        body.len() == expected,
        "{} bytes, not {expected}",
        body.len()
    );
    ensure!(body.ends_with(CHUNK), "the body arrived whole");
    ensure!(
        r_trailers == Some("x-sum=done".to_owned()),
        "the streamed body's trailers reached the app: {r_trailers:?}"
    );
    // A small body with a length (kept in memory, for retries) and
    // trailers: the trailers go upstream with it.
    let h2 = h2_client::<Trailed>();
    let req = Request::post(format!("http://{c2_ip}:{UPSTREAM_PORT}/kept"))
        .header("content-length", "5")
        .body(Trailed {
            chunk: b"hello",
            left: 2,
        })?;
    let r = tokio::time::timeout(Duration::from_secs(30), h2.request(req)).await??;
    ensure!(r.status() == 200, "{}", r.status());
    let seen = r.headers().get("x-seen-trailers").cloned();
    let body = r.into_body().collect().await?.to_bytes();
    ensure!(body == "h2-echo hello".as_bytes(), "{body:?}");
    ensure!(
        seen.as_ref().and_then(|v| v.to_str().ok()) == Some("x-sum=done"),
        "the kept body's trailers reached the app: {seen:?}"
    );
    mesh.done();
    Ok(())
}
