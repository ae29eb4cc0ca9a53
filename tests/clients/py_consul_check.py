"""Drives a Meshwork registry with the `py-consul` client, unpatched.

Usage: python3 py_consul_check.py HOST:PORT [HOST:PORT ...]
Every address is a registry server; the script writes through one and
reads through the others. Exits non-zero (with the failing assertion) on
any difference from what a Consul server would answer.
"""

import sys
import threading
import time

import consul


def client(addr):
    host, port = addr.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port))


def main():
    addrs = sys.argv[1:]
    assert addrs, "usage: py_consul_check.py HOST:PORT ..."
    c = client(addrs[0])
    other = client(addrs[-1])

    # Status and agent/self.
    assert c.status.leader(), "no leader"
    assert len(c.status.peers()) == len(addrs)
    me = c.agent.self()
    assert me["Config"]["Datacenter"] == "dc1", me

    # KV round trip, CAS, recurse, delete.
    assert c.kv.put("py/config", "v1") is True
    index, data = other.kv.get("py/config")
    assert data["Value"] == b"v1", data
    assert c.kv.put("py/config", "v2", cas=data["ModifyIndex"]) is True
    assert c.kv.put("py/config", "v3", cas=data["ModifyIndex"]) is False
    c.kv.put("py/other", "x", flags=7)
    _, items = c.kv.get("py/", recurse=True)
    assert [i["Key"] for i in items] == ["py/config", "py/other"], items
    assert items[1]["Flags"] == 7
    _, keys = c.kv.get("py/", keys=True)
    assert keys == ["py/config", "py/other"], keys
    assert c.kv.delete("py/other") is True
    _, gone = c.kv.get("py/other")
    assert gone is None

    # Blocking KV query that wakes on change.
    index, _ = other.kv.get("py/config")
    threading.Timer(0.5, lambda: c.kv.put("py/config", "v4")).start()
    started = time.monotonic()
    new_index, data = other.kv.get("py/config", index=index, wait="20s")
    assert int(new_index) > int(index) and data["Value"] == b"v4", (index, new_index, data)
    assert time.monotonic() - started < 15

    # Agent service registration with checks.
    c.agent.service.register(
        "pyweb",
        service_id="pyweb-1",
        address="127.0.0.1",
        port=8080,
        tags=["v1", "blue"],
        meta={"version": "1.2"},
        check=consul.Check.ttl("30s"),
    )
    services = c.agent.services()
    assert services["pyweb-1"]["Service"] == "pyweb", services
    assert services["pyweb-1"]["Meta"] == {"version": "1.2"}
    checks = c.agent.checks()
    assert checks["service:pyweb-1"]["Status"] == "critical", checks

    # Not passing yet: ?passing hides it.
    _, nodes = other.health.service("pyweb", passing=True)
    assert nodes == [], nodes
    index, nodes = other.health.service("pyweb")
    assert len(nodes) == 1

    # A blocking health query wakes when the TTL check passes.
    threading.Timer(0.5, lambda: c.agent.check.ttl_pass("service:pyweb-1", "all good")).start()
    new_index, nodes = other.health.service("pyweb", index=index, wait="20s", passing=True)
    assert int(new_index) > int(index), (index, new_index)
    assert len(nodes) == 1, nodes
    entry = nodes[0]
    assert entry["Service"]["ID"] == "pyweb-1" and entry["Service"]["Port"] == 8080
    assert entry["Checks"][0]["Output"] == "all good", entry
    _, tagged = other.health.service("pyweb", tag="blue")
    assert len(tagged) == 1
    _, tagged = other.health.service("pyweb", tag="green")
    assert tagged == []

    # An HTTP check registered through the agent API.
    c.agent.check.register(
        "pyweb-http",
        check=consul.Check.http("http://127.0.0.1:1/health", "10s", timeout="1s"),
        service_id="pyweb-1",
    )
    assert "pyweb-http" in c.agent.checks()

    # Catalog views.
    _, services = other.catalog.services()
    assert services["pyweb"] == ["blue", "v1"], services
    _, instances = other.catalog.service("pyweb")
    assert instances[0]["ServiceID"] == "pyweb-1" and instances[0]["ServiceTags"] == ["v1", "blue"]
    _, nodes = other.catalog.nodes()
    assert nodes, nodes
    assert other.catalog.datacenters() == ["dc1"]

    # Catalog registration of an external service, then deregistration.
    assert c.catalog.register(
        "db-host",
        "10.1.2.3",
        service={"Service": "pydb", "ID": "pydb-1", "Port": 5432},
        check={"Name": "db alive", "CheckID": "db-alive", "ServiceID": "pydb-1", "Status": "passing"},
    )
    _, node = other.catalog.node("db-host")
    assert node["Node"]["Address"] == "10.1.2.3" and "pydb-1" in node["Services"], node
    _, dbs = other.health.service("pydb", passing=True)
    assert len(dbs) == 1, dbs
    _, checks = other.health.checks("pydb")
    assert checks[0]["CheckID"] == "db-alive"
    _, critical = other.health.state("critical")
    assert any(ch["CheckID"] == "pyweb-http" for ch in critical), critical
    assert c.catalog.deregister("db-host")
    _, node = other.catalog.node("db-host")
    assert node is None, node

    # Deregistering through the agent.
    c.agent.service.deregister("pyweb-1")
    assert "pyweb-1" not in c.agent.services()
    _, nodes = other.health.service("pyweb")
    assert nodes == []
    # Config entries.
    assert c.config.set("service-defaults", "pyweb", {"Protocol": "http"})
    entry = other.config.get("service-defaults", "pyweb")
    assert entry["Protocol"] == "http" and entry["ModifyIndex"] > 0, entry
    assert not c.config.set("service-defaults", "pyweb", {"Protocol": "grpc"}, cas=0)
    assert c.config.set("service-defaults", "pyweb", {"Protocol": "grpc"}, cas=entry["ModifyIndex"])
    assert [e["Name"] for e in other.config.list("service-defaults")] == ["pyweb"]
    assert c.config.delete("service-defaults", "pyweb")
    assert other.config.list("service-defaults") == []
    print("py-consul: all checks passed")


if __name__ == "__main__":
    main()
