"""Drives a Meshwork registry with ACLs (default deny) through the
`py-consul` client, unpatched: bootstrap, a policy in Consul's JSON rule
form, a token holding it, and what that token may and may not do.

Usage: python3 py_consul_acl.py HOST:PORT [HOST:PORT ...]
Bootstraps through the first server and uses the token through the last.
"""

import sys

import consul


def client(addr, token=None):
    host, port = addr.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port), token=token)


def refused(call, what):
    try:
        call()
    except consul.ACLPermissionDenied as e:
        assert "Permission denied" in str(e) or "ACL not found" in str(e), (what, e)
        return
    raise AssertionError(f"{what}: not refused")


def main():
    addrs = sys.argv[1:]
    assert addrs, "usage: py_consul_acl.py HOST:PORT ..."
    anonymous = client(addrs[0])
    refused(lambda: anonymous.kv.put("py/x", "1"), "anonymous write")

    boot = anonymous.acl.bootstrap()
    management = boot["SecretID"]
    assert boot["Policies"][0]["Name"] == "global-management", boot
    refused(lambda: anonymous.acl.bootstrap(), "a second bootstrap")

    admin = client(addrs[0], management)
    policy = admin.acl.policy.create(
        "py-app",
        rules={
            "key_prefix": {"py/": {"policy": "write"}},
            "service_prefix": {"": {"policy": "read"}},
            "node_prefix": {"": {"policy": "read"}},
        },
    )
    assert policy["Name"] == "py-app", policy
    created = admin.acl.token.create(description="py app", policies_name=["py-app"])
    secret = created["SecretID"]
    assert admin.acl.token.read(created["AccessorID"])["Description"] == "py app"

    admin.kv.put("other/secret", "hidden")
    app = client(addrs[-1], secret)
    assert app.acl.token.read_self()["AccessorID"] == created["AccessorID"]
    assert app.kv.put("py/config", "v1") is True
    _, data = app.kv.get("py/config")
    assert data["Value"] == b"v1", data
    refused(lambda: app.kv.put("other/x", "1"), "a write outside the prefix")
    refused(lambda: app.kv.get("other/secret"), "a read outside the prefix")
    refused(lambda: app.acl.token.list(), "listing tokens")
    # A list shows what the token may read, nothing else.
    _, keys = admin.kv.get("", keys=True)
    assert "other/secret" in keys, keys
    _, keys = app.kv.get("", keys=True)
    assert keys == ["py/config"], keys

    # The catalog is readable, writes to it are not.
    admin.agent.service.register("pyweb", service_id="pyweb-1", port=8080)
    _, services = app.catalog.services()
    assert "pyweb" in services, services
    refused(
        lambda: app.agent.service.register("pyrogue", service_id="pyrogue-1", port=1),
        "registering a service",
    )

    # Revoked: refused at once.
    assert admin.acl.token.delete(created["AccessorID"]) is True
    refused(lambda: app.kv.get("py/config"), "a revoked token")
    print("all checks passed")


if __name__ == "__main__":
    main()
