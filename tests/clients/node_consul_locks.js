// Sessions, locks and transactions through the npm `consul` client (v2), unpatched.
//
// Usage: node node_consul_locks.js HOST:PORT [HOST:PORT ...]
//        node node_consul_locks.js --hold HOST:PORT KEY TTL_SECONDS   (a lock holder)
// A lock holder runs as its own process: it creates a session (TTL 0 means
// none), takes KEY's lock, prints "held <session>", never renews, and
// releases when it reads "release" on stdin (or is killed). Exits non-zero
// with the failing assertion on any difference from Consul's answers.
"use strict";

const assert = require("node:assert/strict");
const { spawn } = require("node:child_process");
const readline = require("node:readline");
const Consul = require("consul");

// Keys of this run (a registry may keep an earlier run's keys).
const run = `js-${process.pid}`;

function client(addr) {
  const at = addr.lastIndexOf(":");
  return new Consul({ host: addr.slice(0, at), port: Number(addr.slice(at + 1)) });
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function hold(addr, key, ttl) {
  const c = client(addr);
  const opts = { name: "js-holder", lockdelay: "0s" };
  if (Number(ttl) > 0) {
    opts.ttl = `${ttl}s`;
    opts.behavior = "delete";
  }
  const { ID: sid } = await c.session.create(opts);
  assert.equal(await c.kv.set({ key, value: "holder", acquire: sid }), true);
  console.log(`held ${sid}`);
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line.trim() === "release") {
      assert.equal(await c.kv.set({ key, value: "released", release: sid }), true);
      console.log("released");
      process.exit(0);
    }
  }
}

// Starts a holder process; resolves with it and its session once it holds.
function startHolder(addr, key, ttl) {
  const proc = spawn(process.execPath, [__filename, "--hold", addr, key, String(ttl)], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("holder did not take the lock in 20 s")), 20000);
    const lines = readline.createInterface({ input: proc.stdout });
    lines.on("line", (line) => {
      if (line.startsWith("held ")) {
        clearTimeout(timer);
        resolve({ proc, sid: line.split(" ")[1] });
      }
    });
    proc.on("exit", (code) => reject(new Error(`holder exited (${code}) before holding`)));
  });
}

// Polls KEY every 100 ms until `until(entry)` holds; the milliseconds it took.
async function waitKey(c, key, until, ms) {
  const started = Date.now();
  for (let i = 0; i < ms / 100 + 1; i++) {
    if (until(await c.kv.get(key))) return Date.now() - started;
    await sleep(100);
  }
  throw new Error(`${key}: condition not met within ${ms} ms`);
}

async function expiry(addrs) {
  const c = client(addrs[addrs.length - 1]);
  const key = `${run}/locks/ephemeral`;
  const { proc, sid } = await startHolder(addrs[0], key, 10);
  assert.equal((await c.kv.get(key)).Session, sid);
  proc.kill("SIGKILL");
  const killed = Date.now();
  await waitKey(c, key, (entry) => entry === undefined || entry === null, 40000);
  const after = (Date.now() - killed) / 1000;
  assert.ok(after >= 9 && after <= 35, `TTL 10 s session expired after ${after} s`);
  assert.equal(await c.session.info(sid), undefined);
  return after;
}

async function main() {
  if (process.argv[2] === "--hold") {
    await hold(...process.argv.slice(3, 6));
    return;
  }
  const addrs = process.argv.slice(2);
  assert.ok(addrs.length > 0, "usage: node node_consul_locks.js HOST:PORT ...");
  const c = client(addrs[0]);
  const other = client(addrs[addrs.length - 1]);
  const ttlCheck = expiry(addrs);
  ttlCheck.catch(() => {});

  // Session lifecycle, written on one server and read on another.
  const { ID: sid } = await c.session.create({ name: "js-session", ttl: "30s", lockdelay: "4s" });
  const info = await other.session.info(sid);
  assert.equal(info.ID, sid);
  assert.equal(info.TTL, "30s");
  assert.equal(info.LockDelay, 4e9);
  assert.ok((await other.session.list()).some((s) => s.ID === sid));
  assert.ok((await other.session.node(info.Node)).some((s) => s.ID === sid));
  const renewed = await other.session.renew(sid);
  assert.equal(renewed[0].ID, sid);
  await c.session.destroy(sid);
  assert.equal(await other.session.info(sid), undefined);
  await assert.rejects(other.session.renew(sid), (err) => err.statusCode === 404);
  await assert.rejects(
    c.session.create({ ttl: "1s" }),
    (err) => err.statusCode === 500 && /Invalid Session TTL/.test(err.message),
  );

  // A lock held by another process blocks this one until released.
  const key = `${run}/locks/leader`;
  const { proc, sid: holderSid } = await startHolder(addrs[0], key, 0);
  try {
    const { ID: mine } = await other.session.create({ name: "js-waiter", lockdelay: "0s" });
    assert.ok(!(await other.kv.set({ key, value: "me", acquire: mine })), "a held lock was taken"); // `false` resolves as a falsy value
    assert.equal((await other.kv.get(key)).Session, holderSid);
    proc.stdin.write("release\n");
    await waitKey(other, key, (entry) => entry && entry.Session === undefined, 20000);
    assert.equal(await other.kv.set({ key, value: "me", acquire: mine }), true);
    const entry = await c.kv.get(key);
    assert.equal(entry.Session, mine);
    assert.equal(entry.LockIndex, 2);
    // Lock-delay: destroying the holder's session keeps the key from
    // everyone else for the delay (4 s here).
    const { ID: delayed } = await c.session.create({ name: "js-delayed", lockdelay: "4s" });
    assert.equal(await c.kv.set({ key: `${run}/locks/delay`, value: "d", acquire: delayed }), true);
    await c.session.destroy(delayed);
    const destroyed = Date.now();
    assert.ok(!(await other.kv.set({ key: `${run}/locks/delay`, value: "o", acquire: mine })), "a held lock was taken"); // `false` resolves as a falsy value
    let taken = false;
    for (let i = 0; i < 100 && !taken; i++) {
      taken = await other.kv.set({ key: `${run}/locks/delay`, value: "o", acquire: mine });
      if (!taken) await sleep(200);
    }
    const waited = (Date.now() - destroyed) / 1000;
    assert.ok(taken && waited >= 3.5 && waited <= 12, `lock-delay of 4 s held the lock for ${waited} s`);
  } finally {
    proc.kill("SIGKILL");
  }

  // Transactions: ten writes as one, and a failing check aborts them all.
  const ops = [];
  for (let i = 0; i < 10; i++) {
    ops.push({ KV: { Verb: "set", Key: `${run}/txn/${i}`, Value: Buffer.from(`v${i}`).toString("base64") } });
  }
  const result = await c.transaction.create(ops);
  assert.equal(result.Results.length, 10);
  const items = await other.kv.get({ key: `${run}/txn/`, recurse: true });
  assert.equal(items.length, 10);
  assert.ok(items.every((i) => i.ModifyIndex === items[0].ModifyIndex), "not one write");
  await assert.rejects(
    c.transaction.create([
      { KV: { Verb: "set", Key: `${run}/txn/new`, Value: "eA==" } },
      { KV: { Verb: "check-index", Key: `${run}/txn/1`, Index: items[0].ModifyIndex + 1000 } },
    ]),
    (err) => err.statusCode === 409,
  );
  assert.equal(await other.kv.get(`${run}/txn/new`), undefined);

  const after = await ttlCheck;
  console.log(`npm consul locks: all checks passed (TTL 10 s session expired after ${after} s)`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
