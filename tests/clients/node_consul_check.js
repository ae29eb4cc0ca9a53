// Drives a Meshwork registry with the npm `consul` client (v2), unpatched.
//
// Usage: node node_consul_check.js HOST:PORT [HOST:PORT ...]
// Writes through the first server, reads through the last. Exits non-zero
// with the failing assertion on any difference from Consul's answers.
"use strict";

const assert = require("node:assert/strict");
const Consul = require("consul");

function client(addr) {
  const [host, port] = [addr.slice(0, addr.lastIndexOf(":")), addr.slice(addr.lastIndexOf(":") + 1)];
  return new Consul({ host, port: Number(port) });
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Resolves with the first 'change' event accepted by `accept`, or fails after `ms`.
function nextChange(watch, accept, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no matching change within ${ms} ms`)), ms);
    watch.on("change", (data, res) => {
      if (accept(data, res)) {
        clearTimeout(timer);
        resolve({ data, res });
      }
    });
    watch.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

async function main() {
  const addrs = process.argv.slice(2);
  assert.ok(addrs.length > 0, "usage: node node_consul_check.js HOST:PORT ...");
  const c = client(addrs[0]);
  const other = client(addrs[addrs.length - 1]);

  // Status.
  assert.ok(await c.status.leader());
  assert.equal((await c.status.peers()).length, addrs.length);
  const self = await c.agent.self();
  assert.equal(self.Config.Datacenter, "dc1");

  // KV.
  assert.equal(await c.kv.set("js/config", "v1"), true);
  const item = await other.kv.get("js/config");
  assert.equal(item.Value, "v1");
  assert.equal(await c.kv.set({ key: "js/config", value: "v2", cas: item.ModifyIndex }), true);
  // A failed CAS answers `false` (the client resolves it as a falsy value).
  assert.ok(!(await c.kv.set({ key: "js/config", value: "v3", cas: item.ModifyIndex })));
  assert.equal((await other.kv.get("js/config")).Value, "v2");
  await c.kv.set("js/other", "x");
  const all = await other.kv.get({ key: "js/", recurse: true });
  assert.deepEqual(all.map((i) => i.Key), ["js/config", "js/other"]);
  const keys = await other.kv.keys("js/");
  assert.deepEqual(keys, ["js/config", "js/other"]);
  await c.kv.del("js/other");
  assert.equal(await other.kv.get("js/other"), undefined);

  // A blocking KV query (the client's watch) that wakes on change.
  const kvWatch = other.watch({ method: other.kv.get, options: { key: "js/config", wait: "20s" } });
  const kvChanged = nextChange(kvWatch, (data) => data && data.Value === "v4", 15000);
  await sleep(300);
  await c.kv.set("js/config", "v4");
  await kvChanged;
  kvWatch.end();

  // Agent registration with a TTL check.
  await c.agent.service.register({
    name: "jsweb",
    id: "jsweb-1",
    address: "127.0.0.1",
    port: 9090,
    tags: ["v2"],
    meta: { team: "core" },
    check: { ttl: "30s" },
  });
  const services = await c.agent.service.list();
  assert.equal(services["jsweb-1"].Service, "jsweb");
  assert.deepEqual(services["jsweb-1"].Meta, { team: "core" });
  assert.deepEqual(await other.health.service({ service: "jsweb", passing: true }), []);

  // A blocking health query (watch) that wakes when the check passes.
  const healthWatch = other.watch({
    method: other.health.service,
    options: { service: "jsweb", passing: true, wait: "20s" },
  });
  const healthy = nextChange(healthWatch, (data) => Array.isArray(data) && data.length === 1, 15000);
  await sleep(300);
  await c.agent.check.pass({ id: "service:jsweb-1", note: "fine" });
  const { data } = await healthy;
  healthWatch.end();
  assert.equal(data[0].Service.Port, 9090);
  assert.equal(data[0].Checks[0].Status, "passing");

  // An HTTP check through the agent.
  await c.agent.check.register({
    name: "jsweb-http",
    serviceid: "jsweb-1",
    http: "http://127.0.0.1:1/health",
    interval: "10s",
    timeout: "1s",
  });
  assert.ok((await c.agent.check.list())["jsweb-http"]);

  // Catalog views.
  const catalogServices = await other.catalog.service.list();
  assert.deepEqual(catalogServices.jsweb, ["v2"]);
  const instances = await other.catalog.service.nodes("jsweb");
  assert.equal(instances[0].ServiceID, "jsweb-1");
  assert.ok((await other.catalog.node.list()).length > 0);
  assert.deepEqual(await other.catalog.datacenters(), ["dc1"]);
  const checks = await other.health.checks("jsweb");
  assert.ok(checks.some((ch) => ch.CheckID === "jsweb-http"));

  // Deregistration.
  await c.agent.service.deregister("jsweb-1");
  assert.equal((await c.agent.service.list())["jsweb-1"], undefined);
  assert.deepEqual(await other.health.service("jsweb"), []);
  console.log("npm consul: all checks passed");
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
