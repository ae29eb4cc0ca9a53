"""Sessions, locks and transactions through the `py-consul` client, unpatched.

Usage: python3 py_consul_locks.py HOST:PORT [HOST:PORT ...]
       python3 py_consul_locks.py --hold HOST:PORT KEY TTL   (a lock holder)

Every address is a registry server. A lock holder runs as its own process:
it creates a session, takes KEY's lock, prints "held <session>", then
renews nothing; it releases when it reads "release" on stdin, or is killed.
Exits non-zero (with the failing assertion) on any difference from what a
Consul server would answer.
"""

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import consul

# Keys of this run (a registry may keep an earlier run's keys).
RUN = f"py-{os.getpid()}"


def client(addr):
    host, port = addr.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port))


def raw(addr, method, path, body=None):
    """(status, body) of a plain HTTP request, for what py-consul refuses to send."""
    data = None if body is None else body.encode()
    req = urllib.request.Request(f"http://{addr}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def hold(addr, key, ttl):
    c = client(addr)
    ttl = int(ttl)
    sid = c.session.create(name="holder", behavior="delete" if ttl else "release", ttl=ttl or None, lock_delay=0)
    assert c.kv.put(key, "holder", acquire=sid) is True
    print(f"held {sid}", flush=True)
    line = sys.stdin.readline()
    if line.strip() == "release":
        assert c.kv.put(key, "released", release=sid) is True
        print("released", flush=True)


def start_holder(addr, key, ttl):
    proc = subprocess.Popen(
        [sys.executable, __file__, "--hold", addr, key, str(ttl)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("held "), f"holder said {line!r}"
    return proc, line.split()[1]


def wait_key(c, key, index, until, deadline_s):
    """Blocks on KEY until `until(entry)` holds; returns (entry, seconds)."""
    started = time.monotonic()
    for _ in range(100):
        left = deadline_s - (time.monotonic() - started)
        assert left > 0, f"{key}: condition not met within {deadline_s} s"
        index, entry = c.kv.get(key, index=index, wait=f"{max(1, int(left))}s")
        if until(entry):
            return entry, time.monotonic() - started
    raise AssertionError(f"{key}: too many wake-ups")


def sessions(c, other, addrs):
    # Create on one server, read on another; renew; destroy.
    sid = c.session.create(name="py-session", ttl=30, lock_delay=5)
    index, info = other.session.info(sid)
    assert info["ID"] == sid and info["Name"] == "py-session", info
    assert info["TTL"] == "30s" and info["LockDelay"] == 5_000_000_000, info
    assert info["Behavior"] == "release" and info["Node"], info
    _, listed = other.session.list()
    assert sid in [s["ID"] for s in listed], listed
    _, on_node = other.session.node(info["Node"])
    assert sid in [s["ID"] for s in on_node], on_node
    renewed = other.session.renew(sid)
    assert renewed["ID"] == sid, renewed
    # A blocking list wakes on a destroy (other sessions come and go
    # meanwhile: wait until this one is gone).
    threading.Timer(0.5, lambda: c.session.destroy(sid)).start()
    started = time.monotonic()
    for _ in range(50):
        new_index, listed = other.session.list(index=index, wait="20s")
        assert int(new_index) > int(index), (index, new_index)
        index = new_index
        if sid not in [s["ID"] for s in listed]:
            break
    assert sid not in [s["ID"] for s in listed], listed
    assert time.monotonic() - started < 15
    _, gone = other.session.info(sid)
    assert gone is None, gone
    try:
        other.session.renew(sid)
        raise AssertionError("renewing a destroyed session succeeded")
    except consul.NotFound:
        pass

    # Bad input: Consul's statuses and messages, nothing created.
    before = len(c.session.list()[1])
    status, body = raw(addrs[0], "PUT", "/v1/session/create", '{"TTL": "5s"}')
    assert status == 500 and body.startswith("Invalid Session TTL '5000000000'"), (status, body)
    status, body = raw(addrs[0], "PUT", "/v1/session/create", '{"TTL": "25h"}')
    assert status == 500 and "must be between [10s=24h0m0s]" in body, (status, body)
    status, body = raw(addrs[0], "PUT", "/v1/session/create", '{"Behavior": "explode"}')
    assert status == 500 and body.startswith("Invalid Behavior setting 'explode'"), (status, body)
    status, body = raw(addrs[0], "PUT", "/v1/session/create", '{"Checks": ["no-such-check"]}')
    assert status == 500 and body.startswith("Missing check 'no-such-check' registration"), (status, body)
    status, body = raw(addrs[0], "PUT", "/v1/session/create", '{"Node": "no-such-node"}')
    assert status == 500 and body.startswith("Missing node registration"), (status, body)
    assert len(c.session.list()[1]) == before
    # Acquiring with a destroyed session: Consul's 500, nothing written.
    status, body = raw(addrs[0], "PUT", f"/v1/kv/{RUN}/locks/nobody?acquire={sid}", "x")
    assert status == 500 and body.startswith(f'invalid session "{sid}"'), (status, body)
    assert c.kv.get(f"{RUN}/locks/nobody")[1] is None


def locks(c, other, addrs):
    key = f"{RUN}/locks/leader"
    # One process holds the lock; another session cannot take it.
    holder, holder_sid = start_holder(addrs[0], key, 0)
    try:
        mine = other.session.create(name="waiter", lock_delay=0)
        assert other.kv.put(key, "me", acquire=mine) is False
        index, entry = other.kv.get(key)
        assert entry["Session"] == holder_sid and entry["LockIndex"] == 1, entry
        # The holder releases; a blocking read sees the lock free, then the
        # waiter takes it.
        holder.stdin.write("release\n")
        holder.stdin.flush()
        entry, _ = wait_key(other, key, index, lambda e: e and "Session" not in e, 20)
        assert entry["Value"] == b"released", entry
        assert other.kv.put(key, "me", acquire=mine) is True
        _, entry = c.kv.get(key)
        assert entry["Session"] == mine and entry["LockIndex"] == 2, entry
        assert holder.wait(timeout=20) == 0
    finally:
        holder.kill()

    # Lock-delay: after the holder's session is destroyed, nobody takes the
    # lock for its lock-delay (here 3 s); then the next acquire succeeds.
    delayed = c.session.create(name="delayed", lock_delay=3)
    assert c.kv.put(f"{RUN}/locks/delay", "d", acquire=delayed) is True
    c.session.destroy(delayed)
    destroyed_at = time.monotonic()
    other_sid = other.session.create(name="after-delay", lock_delay=0)
    assert other.kv.put(f"{RUN}/locks/delay", "o", acquire=other_sid) is False
    for _ in range(100):
        if other.kv.put(f"{RUN}/locks/delay", "o", acquire=other_sid):
            break
        time.sleep(0.2)
    waited = time.monotonic() - destroyed_at
    assert 2.5 <= waited <= 10, f"lock-delay of 3 s held the lock for {waited:.1f} s"
    c.session.destroy(other_sid)
    c.session.destroy(mine)


def expiry(addrs, results):
    """A holder with a 10 s TTL and behavior=delete is killed: its key is
    deleted once the TTL (with Consul's 2x grace) passes, not before."""
    try:
        c = client(addrs[-1])
        key = f"{RUN}/locks/ephemeral"
        holder, sid = start_holder(addrs[0], key, 10)
        index, entry = c.kv.get(key)
        assert entry["Session"] == sid, entry
        holder.kill()
        holder.wait()
        killed = time.monotonic()
        entry, _ = wait_key(c, key, index, lambda e: e is None, 40)
        gone_after = time.monotonic() - killed
        assert 9 <= gone_after <= 35, f"TTL 10 s session expired after {gone_after:.1f} s"
        _, info = c.session.info(sid)
        assert info is None, info
        results.append(gone_after)
    except BaseException as e:  # reported by the main thread
        results.append(e)


def transactions(c, other):
    ops = [
        {"KV": {"Verb": "set", "Key": f"{RUN}/txn/{i}", "Value": base64.b64encode(f"v{i}".encode()).decode()}}
        for i in range(10)
    ]
    result = c.txn.put(ops)
    assert result["Errors"] is None and len(result["Results"]) == 10, result
    _, items = other.kv.get(f"{RUN}/txn/", recurse=True)
    assert len(items) == 10, items
    index = items[0]["ModifyIndex"]
    assert all(i["ModifyIndex"] == index for i in items), "not one write"
    # A failing check-index aborts everything.
    ops = [
        {"KV": {"Verb": "set", "Key": f"{RUN}/txn/new", "Value": "eA=="}},
        {"KV": {"Verb": "delete", "Key": f"{RUN}/txn/0"}},
        {"KV": {"Verb": "check-index", "Key": f"{RUN}/txn/1", "Index": index + 1000}},
    ]
    try:
        c.txn.put(ops)
        raise AssertionError("a transaction with a failing check-index succeeded")
    except consul.exceptions.ClientError as e:
        assert str(e).startswith("409"), e
        body = json.loads(str(e)[4:])
        assert body["Errors"][0]["OpIndex"] == 2, body
        assert "current modify index" in body["Errors"][0]["What"], body
    assert other.kv.get(f"{RUN}/txn/new")[1] is None
    assert other.kv.get(f"{RUN}/txn/0")[1] is not None
    # A read-only transaction.
    result = other.txn.put([{"KV": {"Verb": "get", "Key": f"{RUN}/txn/3"}}])
    assert base64.b64decode(result["Results"][0]["KV"]["Value"]) == b"v3", result
    # Catalog operations join the transaction: a service on a node that
    # does not exist undoes the node registered before it.
    node = f"{RUN}-db"
    node_op = {"Node": {"Verb": "set", "Node": {"Node": node, "Address": "10.9.9.9"}}}
    service_op = {"Service": {"Verb": "set", "Node": node, "Service": {"ID": "pg-1", "Service": f"{RUN}-pg", "Port": 5432}}}
    try:
        c.txn.put([node_op, dict(service_op, Service=dict(service_op["Service"], Node=f"{node}-missing"))])
        raise AssertionError("a service on a missing node was registered")
    except consul.exceptions.ClientError as e:
        assert "Missing node registration" in str(e), e
    assert other.catalog.node(node)[1] is None
    result = c.txn.put([node_op, service_op])
    assert [list(r)[0] for r in result["Results"]] == ["Node", "Service"], result
    _, instances = other.catalog.service(f"{RUN}-pg")
    assert [i["ServiceID"] for i in instances] == ["pg-1"], instances
    # Too many operations: Consul's 413.
    too_many = [{"KV": {"Verb": "get", "Key": "k"}}] * 129
    try:
        c.txn.put(too_many)
        raise AssertionError("129 operations were accepted")
    except consul.exceptions.ClientError as e:
        assert str(e).startswith("413"), e


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "--hold":
        hold(*sys.argv[2:5])
        return
    addrs = sys.argv[1:]
    assert addrs, "usage: py_consul_locks.py HOST:PORT ..."
    c = client(addrs[0])
    other = client(addrs[-1])
    expired = []
    ttl_check = threading.Thread(target=expiry, args=(addrs, expired), daemon=True)
    ttl_check.start()
    sessions(c, other, addrs)
    locks(c, other, addrs)
    transactions(c, other)
    ttl_check.join(timeout=60)
    assert expired, "the TTL expiry check did not finish"
    if isinstance(expired[0], BaseException):
        raise expired[0]
    print(f"py-consul locks: all checks passed (TTL 10 s session expired after {expired[0]:.1f} s)")


if __name__ == "__main__":
    main()
