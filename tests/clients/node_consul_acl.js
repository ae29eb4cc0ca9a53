// Drives a Meshwork registry with ACLs (default deny) through the npm
// `consul` client (v2), unpatched: bootstrap with it, then a token with a
// policy (made over plain HTTP: the client has no policy API), and what
// that token may and may not do through the client.
//
// Usage: node node_consul_acl.js HOST:PORT [HOST:PORT ...]
"use strict";

const assert = require("node:assert/strict");
const Consul = require("consul");

function client(addr, token) {
  const [host, port] = [addr.slice(0, addr.lastIndexOf(":")), addr.slice(addr.lastIndexOf(":") + 1)];
  const opts = { host, port: Number(port) };
  if (token) opts.defaults = { token };
  return new Consul(opts);
}

async function api(addr, method, path, token, body) {
  const res = await fetch(`http://${addr}${path}`, {
    method,
    headers: { "X-Consul-Token": token },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  assert.equal(res.status, 200, `${method} ${path}: ${res.status} ${text}`);
  return JSON.parse(text);
}

async function refused(promise, what) {
  try {
    await promise;
  } catch (err) {
    assert.equal(err.statusCode, 403, `${what}: ${err}`);
    return;
  }
  assert.fail(`${what}: not refused`);
}

async function main() {
  const addrs = process.argv.slice(2);
  assert.ok(addrs.length > 0, "usage: node node_consul_acl.js HOST:PORT ...");
  const anonymous = client(addrs[0]);
  await refused(anonymous.kv.set("js/x", "1"), "anonymous write");

  const boot = await anonymous.acl.bootstrap();
  const management = boot.SecretID;
  assert.ok(management);
  await refused(anonymous.acl.bootstrap(), "a second bootstrap");

  await api(addrs[0], "PUT", "/v1/acl/policy", management, {
    Name: "js-app",
    Rules: 'key_prefix "js/" {\n  policy = "write"\n}\n',
  });
  const token = await api(addrs[0], "PUT", "/v1/acl/token", management, {
    Description: "js app",
    Policies: [{ Name: "js-app" }],
  });

  const admin = client(addrs[0], management);
  assert.equal(await admin.kv.set("other/secret", "hidden"), true);

  const app = client(addrs[addrs.length - 1], token.SecretID);
  assert.equal(await app.kv.set("js/config", "v1"), true);
  assert.equal((await app.kv.get("js/config")).Value, "v1");
  await refused(app.kv.set("other/x", "1"), "a write outside the prefix");
  await refused(app.kv.get("other/secret"), "a read outside the prefix");
  // A per-call token wins over the client's default.
  assert.equal((await anonymous.kv.get({ key: "js/config", token: token.SecretID })).Value, "v1");
  const keys = await app.kv.keys("");
  assert.deepEqual(keys, ["js/config"]);

  await api(addrs[0], "DELETE", `/v1/acl/token/${token.AccessorID}`, management);
  await refused(app.kv.get("js/config"), "a revoked token");
  console.log("all checks passed");
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
