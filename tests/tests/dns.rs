//! The DNS interface against real servers, queried with `dig` (Debian's
//! dnsutils) and with raw packets: name forms, health, tags, SRV with
//! additional records, NXDOMAIN vs NODATA, truncation and TCP fallback,
//! and garbage.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshwork_tests::{Cluster, wait_for};
use serde_json::json;

const DNS_PORT: &str = "28600";

/// Runs `dig` against server `i` and returns its output.
fn dig(cluster: &Cluster, i: usize, args: &[&str]) -> Result<String> {
    let out = Command::new("dig")
        .arg(format!("@{}", cluster.servers[i].ip))
        .args(["-p", DNS_PORT, "+time=3", "+tries=1"])
        .args(args)
        .output()
        .context("run dig (install dnsutils: scripts/install-test-deps.sh)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn short(cluster: &Cluster, i: usize, args: &[&str]) -> Result<Vec<String>> {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    let mut lines: Vec<String> = dig(cluster, i, &all)?
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    Ok(lines)
}

async fn catalog_register(cluster: &Cluster, body: serde_json::Value) -> Result<()> {
    let resp = cluster
        .http
        .put(format!("{}/v1/catalog/register", cluster.servers[0].http()))
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    ensure!(
        status == 200,
        "register answered {status}: {}",
        resp.text().await?
    );
    Ok(())
}

async fn instance(cluster: &Cluster, n: u32, status: &str, tags: &[&str]) -> Result<()> {
    catalog_register(
        cluster,
        json!({
            "Node": format!("host{n}"), "Address": format!("198.18.1.{n}"),
            "Service": {"Service": "web", "ID": format!("web-{n}"), "Port": 8000 + n, "Tags": tags},
            "Check": {"CheckID": format!("web-{n}-alive"), "Name": "alive", "ServiceID": format!("web-{n}"), "Status": status}
        }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_health_and_tags_resolve_with_dig() -> Result<()> {
    let cluster = Cluster::start(3, &["--dns-service-ttl", "web=7"]).await?;
    instance(&cluster, 1, "passing", &["v1", "primary"]).await?;
    instance(&cluster, 2, "warning", &["v1"]).await?;
    instance(&cluster, 3, "critical", &["v2"]).await?;

    // Every server answers from its own state, without polling.
    for i in 0..3 {
        wait_for("three servers to agree", Duration::from_secs(5), || async {
            (short(&cluster, i, &["web.service.mesh", "A"]).ok()? == ["198.18.1.1", "198.18.1.2"])
                .then_some(())
        })
        .await?;
    }
    assert_eq!(
        short(&cluster, 1, &["v1.web.service.mesh", "A"])?,
        ["198.18.1.1", "198.18.1.2"]
    );
    assert_eq!(
        short(&cluster, 1, &["primary.web.service.dc1.mesh", "A"])?,
        ["198.18.1.1"]
    );
    assert!(
        dig(&cluster, 1, &["web.service.mesh", "A"])?.contains("\t7\tIN\tA\t"),
        "service TTL"
    );

    // SRV, plain and RFC 2782, with A records in the additional section.
    let srv = dig(&cluster, 2, &["web.service.mesh", "SRV"])?;
    assert!(
        srv.contains("ANSWER: 2") && srv.contains("ADDITIONAL: 3"),
        "{srv}"
    ); // +1 for OPT
    assert!(
        srv.contains("host1.node.dc1.mesh.") && srv.contains("8001"),
        "{srv}"
    );
    let rfc = short(&cluster, 2, &["_web._tcp.service.mesh", "SRV"])?;
    assert_eq!(rfc.len(), 2, "{rfc:?}");
    let tagged = short(&cluster, 2, &["_web._primary.service.mesh", "SRV"])?;
    assert_eq!(tagged, ["1 1 8001 host1.node.dc1.mesh."]);

    // A health change shows in the next answer.
    instance(&cluster, 1, "critical", &["v1", "primary"]).await?;
    wait_for(
        "host1 to leave the answers",
        Duration::from_secs(5),
        || async {
            (short(&cluster, 0, &["web.service.mesh", "A"]).ok()? == ["198.18.1.2"]).then_some(())
        },
    )
    .await?;
    instance(&cluster, 3, "passing", &["v2"]).await?;
    wait_for(
        "host3 to join the answers",
        Duration::from_secs(5),
        || async {
            (short(&cluster, 0, &["web.service.mesh", "A"]).ok()? == ["198.18.1.2", "198.18.1.3"])
                .then_some(())
        },
    )
    .await?;

    // NXDOMAIN vs NODATA, both with the SOA.
    let nx = dig(&cluster, 0, &["nosuch.service.mesh", "A"])?;
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains("AUTHORITY: 1") && nx.contains("SOA"),
        "{nx}"
    );
    let nodata = dig(&cluster, 0, &["web.service.mesh", "AAAA"])?;
    assert!(
        nodata.contains("status: NOERROR")
            && nodata.contains("ANSWER: 0")
            && nodata.contains("SOA"),
        "{nodata}"
    );
    assert!(nodata.contains("flags: qr aa"), "authoritative: {nodata}");

    // Nodes, PTR, the apex.
    assert_eq!(
        short(&cluster, 0, &["host2.node.mesh", "A"])?,
        ["198.18.1.2"]
    );
    assert_eq!(
        short(&cluster, 0, &["-x", "198.18.1.2"])?,
        ["host2.node.dc1.mesh."]
    );
    assert_eq!(short(&cluster, 0, &["mesh", "SOA"])?.len(), 1);
    assert_eq!(short(&cluster, 0, &["mesh", "NS"])?, ["ns.mesh."]);
    // Outside the domain without recursors: refused.
    assert!(dig(&cluster, 0, &["example.com", "A"])?.contains("status: REFUSED"));

    // Answers come from the answer cache once made, and a change still
    // shows in the very next answer (no waiting this time).
    let hits = cluster.metric(0, "meshwork_dns_cache_hits_total").await?;
    for _ in 0..3 {
        assert_eq!(
            short(&cluster, 0, &["web.service.mesh", "A"])?,
            ["198.18.1.2", "198.18.1.3"]
        );
    }
    assert!(cluster.metric(0, "meshwork_dns_cache_hits_total").await? >= hits + 2.0);
    instance(&cluster, 2, "critical", &["v1"]).await?;
    // The write was acknowledged by the leader; server 0 answers once it
    // has applied it (a stale read), so wait for its index, not the answer.
    wait_for(
        "server 0 to apply the change",
        Duration::from_secs(5),
        || async {
            let health = cluster.instance_health(0, "web").await.ok()?;
            health
                .iter()
                .any(|(id, status)| id == "web-2" && status == "critical")
                .then_some(())
        },
    )
    .await?;
    assert_eq!(
        short(&cluster, 0, &["web.service.mesh", "A"])?,
        ["198.18.1.3"]
    );
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_answers_truncate_over_udp_and_come_whole_over_tcp() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &["--dns-domain", "consul"]).await?;
    for n in 1..=40 {
        instance(&cluster, n, "passing", &[]).await?;
    }
    let udp = dig(
        &cluster,
        0,
        &["+noedns", "+ignore", "web.service.consul", "SRV"],
    )?;
    assert!(
        udp.contains("flags: qr aa tc") || udp.contains(" tc"),
        "{udp}"
    );
    let tcp = dig(&cluster, 0, &["+tcp", "web.service.consul", "SRV"])?;
    assert!(tcp.contains("ANSWER: 40"), "{tcp}");
    // dig's default: truncated over UDP, retried over TCP.
    assert_eq!(short(&cluster, 0, &["web.service.consul", "A"])?.len(), 40);
    // EDNS lets more fit over UDP.
    let edns = dig(
        &cluster,
        0,
        &["+bufsize=4096", "+ignore", "web.service.consul", "A"],
    )?;
    assert!(
        edns.contains("ANSWER: 40") && !edns.contains(" tc"),
        "{edns}"
    );
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_packets_get_formerr_or_silence_and_the_server_keeps_answering() -> Result<()> {
    let cluster = Cluster::start_in_process(1, &[]).await?;
    instance(&cluster, 1, "passing", &[]).await?;
    let server = format!("{}:{DNS_PORT}", cluster.servers[0].ip);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    // A header claiming one question, followed by junk.
    let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0x3f; 40]);
    socket.send_to(&junk, &server).await?;
    let mut buf = [0u8; 512];
    let (len, _) = tokio::time::timeout(Duration::from_secs(3), socket.recv_from(&mut buf))
        .await
        .context("no answer to a malformed query")??;
    assert!(len >= 12);
    assert_eq!(&buf[..2], &[0xab, 0xcd]);
    assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
    // Too short to answer, and a flood of random sizes: no crash.
    for size in [0usize, 1, 5, 11, 700, 4000] {
        socket.send_to(&vec![0x55; size], &server).await?;
    }
    // Garbage over TCP: a length prefix promising more than is sent, then close.
    {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(&server).await?;
        tcp.write_all(&[0x10, 0x00, 1, 2, 3]).await?;
    }
    assert_eq!(
        short(&cluster, 0, &["web.service.mesh", "A"])?,
        ["198.18.1.1"]
    );
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_domain_go_to_the_recursors() -> Result<()> {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};
    // A stand-in upstream resolver on loopback that answers every A query.
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?;
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        for _ in 0..100 {
            let Ok((len, from)) = upstream.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let mut reply = Message::new();
            reply
                .set_id(query.id())
                .set_message_type(MessageType::Response);
            for q in query.queries() {
                reply.add_query(q.clone());
                reply.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A([127, 0, 0, 99].into())),
                ));
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = upstream.send_to(&bytes, from).await;
            }
        }
    });
    let recursor = upstream_addr.to_string();
    let cluster = Cluster::start_in_process(1, &["--dns-recursors", &recursor]).await?;
    assert_eq!(short(&cluster, 0, &["example.com", "A"])?, ["127.0.0.99"]);
    assert_eq!(
        short(&cluster, 0, &["+tcp", "example.org", "A"])?,
        ["127.0.0.99"]
    );
    // Our own names are still ours.
    let own = dig(&cluster, 0, &["nosuch.service.mesh", "A"])?;
    assert!(own.contains("status: NXDOMAIN"), "{own}");
    cluster.done();
    Ok(())
}

/// One source cannot take the TCP pool: past its share (16) its new
/// connections are closed, and a client from another address still gets
/// its answer over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_tcp_connection() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start_in_process(1, &[]).await?;
    instance(&cluster, 1, "passing", &[]).await?;
    let server: std::net::SocketAddr = format!("{}:{DNS_PORT}", cluster.servers[0].ip).parse()?;
    let hog: std::net::IpAddr = "127.0.0.1".parse()?;
    let mut held = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((hog, 0).into())?;
        held.push(socket.connect(server).await?);
    }
    // The server closes what is past the share: those read EOF at once.
    let mut closed = 0;
    for stream in &mut held {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    ensure!(
        closed == 24,
        "{closed} of 40 connections from one source closed, not 24"
    );
    // Another source is served over TCP meanwhile.
    let other: std::net::IpAddr = "127.0.0.2".parse()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((other, 0).into())?;
    let mut stream = socket.connect(server).await?;
    // A query for web.service.mesh A, id 0x1234, with its length prefix.
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["web", "service", "mesh"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut len))
        .await
        .context("no TCP answer for another source")??;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await?;
    ensure!(
        answer[..2] == [0x12, 0x34] && answer[7] == 1,
        "one answer record: {answer:?}"
    );
    drop(held);
    cluster.done();
    Ok(())
}
