#!/usr/bin/env python3
"""Runs a two-member Patroni cluster (PostgreSQL 15) against a DCS and checks HA.

Usage:
  python3 patroni_check.py --dcs consul|etcd3 --dcs-addr 127.0.0.1:PORT \
      --workdir DIR [--ttl 20] [--start-etcd] [--orphan kill|keep] [--keep-workdir]

What it does (every wait is bounded in time and in iterations):
  1. Writes configs for members pg1 and pg2 under DIR (PostgreSQL and the
     Patroni REST API on free 127.0.0.1 ports, a scope unique to the run) and
     starts both Patroni daemons as the `postgres` OS user (setpriv).
  2. Waits until exactly one member is primary and the other is a streaming
     replica (primary's /patroni replication list + a row written on the
     primary and read back on the replica).
  3. Failover 1: SIGTERM to the primary's Patroni (clean shutdown, Patroni
     deletes its leader key); measures the time until the other member is
     primary; restarts the stopped member and waits until it is a streaming
     replica again.
  4. Failover 2: SIGKILL to the (new) primary's Patroni. Its postmaster is in
     its own session (Patroni starts it via setsid) and keeps running as a
     primary. With --orphan kill (the default) the harness SIGKILLs the
     orphaned postmaster's process group too, i.e. it simulates a whole-node
     crash; with --orphan keep it is left running (split brain until the
     killed Patroni is restarted, which then demotes/rewinds it). The time
     until the other member is primary (the leader key/session has to expire)
     is measured; the killed member is restarted and must rejoin as a
     streaming replica.
  5. Prints one JSON line with the timings; exits 0 on success, 1 with a
     message (and log tails) on any failed expectation.
All processes it started (Patroni, their postmasters, etcd with --start-etcd)
are killed in a finally block. All traffic stays on 127.0.0.1.
"""

import argparse
import base64
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PG_BIN = "/usr/lib/postgresql/15/bin"
PATRONI = "/usr/bin/patroni"
PSQL = "/usr/bin/psql"
SETPRIV = "/usr/bin/setpriv"
ETCD = "/usr/bin/etcd"
OS_USER = "postgres"
SUPERUSER_PW = "mw-super-pw"
REPL_PW = "mw-repl-pw"

# No proxies, whatever the environment says: only loopback traffic.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CheckFailed(Exception):
    pass


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted("got signal %d" % signum)


def log(msg):
    print("[patroni_check %6.1fs] %s" % (time.monotonic() - T0, msg), file=sys.stderr, flush=True)


T0 = time.monotonic()


def free_ports(n):
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def http(method, url, body=None, timeout=2.0):
    """Returns (status, parsed JSON or raw text, or None on connection error)."""
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None, None
    try:
        return status, json.loads(raw.decode() or "null")
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_until(what, fn, timeout, interval=0.25):
    """Polls fn() until it returns a truthy value; bounded by time and count."""
    deadline = time.monotonic() + timeout
    max_iter = int(timeout / interval) + 10
    last = None
    for _ in range(max_iter):
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise CheckFailed("timed out after %.0fs waiting for %s" % (timeout, what))


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def psql(port, sql, timeout=10):
    env = {"PATH": "/usr/bin:/bin", "PGPASSWORD": SUPERUSER_PW, "PGCONNECT_TIMEOUT": "3",
           "LANG": "C.UTF-8"}
    try:
        r = subprocess.run([PSQL, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                            "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres",
                            "-c", sql], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def child_env():
    """Environment for Patroni/etcd: no proxies, no CONSUL_* (python-consul reads
    CONSUL_HTTP_ADDR/TOKEN/SSL), no PATRONI_* (Patroni reads config from them)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONSUL_", "PATRONI_", "ETCD"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    pw = pwd.getpwnam(OS_USER)
    env.update({"HOME": pw.pw_dir, "USER": OS_USER, "LOGNAME": OS_USER,
                "PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                "PYTHONUNBUFFERED": "1"})
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    return env


class Member:
    def __init__(self, name, root, scope, dcs_section, dyn, ttl):
        self.name = name
        self.dir = os.path.join(root, name)
        self.data_dir = os.path.join(self.dir, "data")
        self.sock_dir = os.path.join(self.dir, "sock")
        self.cfg = os.path.join(self.dir, "patroni.yml")
        self.logfile = os.path.join(self.dir, "patroni.log")
        self.api_port, self.pg_port = free_ports(2)
        self.proc = None
        self.postmaster_pgids = set()
        os.makedirs(self.sock_dir, exist_ok=True)
        cfg = {
            "scope": scope,
            "namespace": "/service/",
            "name": name,
            "log": {"level": "INFO"},
            "restapi": {"listen": "127.0.0.1:%d" % self.api_port,
                        "connect_address": "127.0.0.1:%d" % self.api_port},
            "bootstrap": {
                "dcs": dyn,
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
                "pg_hba": [
                    "local all all trust",
                    "host replication replicator 127.0.0.1/32 md5",
                    "host all all 127.0.0.1/32 md5",
                ],
            },
            "postgresql": {
                "listen": "127.0.0.1:%d" % self.pg_port,
                "connect_address": "127.0.0.1:%d" % self.pg_port,
                "data_dir": self.data_dir,
                "bin_dir": PG_BIN,
                "pgpass": os.path.join(self.dir, "pgpass"),
                "use_unix_socket": False,
                "authentication": {
                    "superuser": {"username": "postgres", "password": SUPERUSER_PW},
                    "replication": {"username": "replicator", "password": REPL_PW},
                },
                "parameters": {"unix_socket_directories": self.sock_dir},
            },
            "watchdog": {"mode": "off"},
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False,
                     "nosync": False},
        }
        cfg.update(dcs_section)
        # JSON is valid YAML; Patroni reads it with yaml.safe_load.
        with open(self.cfg, "w") as f:
            json.dump(cfg, f, indent=2)

    # -- processes ---------------------------------------------------------
    def start(self):
        logf = open(self.logfile, "ab")
        try:
            self.proc = subprocess.Popen(
                [SETPRIV, "--reuid=" + OS_USER, "--regid=" + OS_USER, "--init-groups",
                 PATRONI, self.cfg],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.dir, env=child_env(), start_new_session=True)
        finally:
            logf.close()
        log("started %s patroni pid %d (api 127.0.0.1:%d, pg 127.0.0.1:%d)"
            % (self.name, self.proc.pid, self.api_port, self.pg_port))

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        if self.running():
            os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def postmaster_pid(self):
        """PID of this member's running postmaster, checked against /proc."""
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return None
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            return None
        if not cmd or not cmd[0].endswith(b"postgres") or self.data_dir.encode() not in cmd:
            return None
        if not alive(pid):
            return None
        try:
            self.postmaster_pgids.add(os.getpgid(pid))
        except OSError:
            pass
        return pid

    def kill_postgres(self):
        """SIGKILLs the postmaster's process group (Patroni starts it under setsid,
        so the group holds the postmaster and all its backends)."""
        pid = self.postmaster_pid()
        pgids = set(self.postmaster_pgids)
        if pid:
            try:
                pgids.add(os.getpgid(pid))
            except OSError:
                pass
        own = os.getpgid(0)
        for pgid in pgids:
            if pgid in (own, 0, 1):
                continue
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pid

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.wait_exit(10)
        self.kill_postgres()

    # -- state -------------------------------------------------------------
    def api(self, path):
        return http("GET", "http://127.0.0.1:%d%s" % (self.api_port, path))

    def status(self):
        code, body = self.api("/patroni")
        return body if code in (200, 503) and isinstance(body, dict) else None

    def role(self):
        """'primary', 'replica' or None, from GET /patroni plus /primary or /replica."""
        if not self.running():
            return None
        st = self.status()
        if not st or st.get("state") != "running":
            return None
        if st.get("role") in ("master", "primary"):
            code, _ = self.api("/primary")
            return "primary" if code == 200 else None
        if st.get("role") == "replica":
            code, _ = self.api("/replica")
            return "replica" if code == 200 else None
        return None

    def log_tail(self, n=40):
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"


class Etcd:
    """A throwaway single-node etcd on 127.0.0.1 (only with --start-etcd)."""

    def __init__(self, addr, root):
        self.addr = addr
        self.dir = os.path.join(root, "etcd")
        self.logfile = os.path.join(root, "etcd.log")
        self.proc = None

    def start(self):
        peer = free_ports(1)[0]
        logf = open(self.logfile, "ab")
        try:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "mw", "--data-dir", self.dir,
                 "--listen-client-urls", "http://%s" % self.addr,
                 "--advertise-client-urls", "http://%s" % self.addr,
                 "--listen-peer-urls", "http://127.0.0.1:%d" % peer,
                 "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % peer,
                 "--initial-cluster", "mw=http://127.0.0.1:%d" % peer,
                 "--initial-cluster-state", "new", "--listen-metrics-urls", "",
                 "--enable-v2=false"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=child_env(), start_new_session=True)
        finally:
            logf.close()
        wait_until("etcd on %s" % self.addr,
                   lambda: self.proc.poll() is None and http("GET", "http://%s/version" % self.addr)[0] == 200,
                   timeout=30)
        log("started etcd pid %d on %s" % (self.proc.pid, self.addr))

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def delete_dcs_keys(kind, addr, scope, members=()):
    """Best effort: removes the run's keys (service/<scope>/...) from the DCS,
    and with consul the services Patroni registered (register_service):
    python-consul 0.7.1 deregisters with GET, which Consul >= 1.0 answers 405."""
    prefix = "service/%s/" % scope
    if kind == "consul":
        http("DELETE", "http://%s/v1/kv/%s?recurse=1" % (addr, prefix), timeout=5)
        for name in members:
            http("PUT", "http://%s/v1/agent/service/deregister/%s/%s" % (addr, scope, name), body=b"", timeout=5)
    else:
        key = "/" + prefix
        end = key[:-1] + chr(ord(key[-1]) + 1)
        body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                           "range_end": base64.b64encode(end.encode()).decode()}).encode()
        http("POST", "http://%s/v3/kv/deleterange" % addr, body=body, timeout=5)


class Harness:
    def __init__(self, args):
        self.args = args
        self.members = []
        self.etcd = None
        self.summary = {"dcs": args.dcs, "dcs_addr": args.dcs_addr, "ttl": args.ttl,
                        "loop_wait": args.loop_wait, "retry_timeout": args.retry_timeout,
                        "orphan_policy": args.orphan}
        # Bound for "the other member becomes primary": a TTL expiry plus a
        # few loops, generous on a loaded 2-core machine.
        self.failover_timeout = args.ttl * 2 + 10 * args.loop_wait + 30

    def current_roles(self):
        return {m.name: m.role() for m in self.members}

    def wait_topology(self, timeout, what):
        """Waits until exactly one primary and all other members are replicas."""
        def check():
            roles = [(m, m.role()) for m in self.members]
            prim = [m for m, r in roles if r == "primary"]
            reps = [m for m, r in roles if r == "replica"]
            if len(prim) == 1 and len(reps) == len(self.members) - 1:
                return prim[0], reps
            return None
        try:
            return wait_until(what, check, timeout, interval=0.5)
        except CheckFailed:
            raise CheckFailed("%s; roles now %s" % (
                "timed out after %.0fs waiting for %s" % (timeout, what), self.current_roles()))

    def check_streaming(self, primary, replica, timeout=60):
        """Replica shows up as streaming on the primary, and a row written on the
        primary becomes visible on the replica."""
        def streaming():
            st = primary.status() or {}
            for r in st.get("replication") or []:
                if r.get("application_name") == replica.name and r.get("state") == "streaming":
                    return True
            return False
        wait_until("%s streaming from %s (primary's /patroni replication)" % (replica.name, primary.name),
                   streaming, timeout, interval=0.5)
        token = "%s-%d" % (replica.name, int(time.time() * 1000))
        wrote = wait_until(
            "write on primary %s" % primary.name,
            lambda: psql(primary.pg_port,
                         "CREATE TABLE IF NOT EXISTS mw_check(token text primary key, at timestamptz);"
                         "INSERT INTO mw_check VALUES ('%s', now()); SELECT 'ok';" % token) == "ok",
            timeout=30, interval=1.0)
        assert wrote
        wait_until("row %s replicated to %s" % (token, replica.name),
                   lambda: psql(replica.pg_port,
                                "SELECT token FROM mw_check WHERE token = '%s'" % token) == token,
                   timeout, interval=0.5)
        ro = psql(replica.pg_port, "SELECT pg_is_in_recovery()")
        if ro != "t":
            raise CheckFailed("%s is not in recovery (pg_is_in_recovery=%r)" % (replica.name, ro))
        log("%s streams from %s (row %s replicated)" % (replica.name, primary.name, token))

    def wait_promoted(self, member, t0, what):
        wait_until(what, lambda: member.role() == "primary", self.failover_timeout, interval=0.2)
        return round(time.monotonic() - t0, 2)

    def run(self):
        a = self.args
        root = os.path.abspath(a.workdir)
        os.makedirs(root, exist_ok=True)
        for sub in ("pg1", "pg2", "etcd"):
            shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
        for f in ("etcd.log",):
            try:
                os.remove(os.path.join(root, f))
            except OSError:
                pass

        scope = a.scope or "mwdemo-%d-%d" % (int(time.time()), os.getpid())
        self.summary["scope"] = scope
        host, port = a.dcs_addr.rsplit(":", 1)
        if a.dcs == "consul":
            dcs_section = {"consul": {"host": "%s:%s" % (host, port),
                                      "register_service": bool(a.register_service),
                                      "consistency": a.consistency}}
        else:
            dcs_section = {"etcd3": {"hosts": ["%s:%s" % (host, port)]}}
        dyn = {"ttl": a.ttl, "loop_wait": a.loop_wait, "retry_timeout": a.retry_timeout,
               "maximum_lag_on_failover": 1048576,
               "postgresql": {"use_pg_rewind": True, "use_slots": True,
                              "parameters": {"wal_level": "replica", "hot_standby": "on",
                                             "max_wal_senders": 10, "max_replication_slots": 10,
                                             "wal_keep_size": "128MB", "wal_log_hints": "on"}}}

        if a.start_etcd:
            if a.dcs != "etcd3":
                raise CheckFailed("--start-etcd only makes sense with --dcs etcd3")
            self.etcd = Etcd(a.dcs_addr, root)
            self.etcd.start()
        else:
            if a.dcs == "consul":
                code, _ = http("GET", "http://%s/v1/status/leader" % a.dcs_addr)
            else:
                code, _ = http("GET", "http://%s/version" % a.dcs_addr)
            if code != 200:
                raise CheckFailed("DCS at %s does not answer (status %r)" % (a.dcs_addr, code))

        self.members = [Member(n, root, scope, dcs_section, dyn, a.ttl) for n in ("pg1", "pg2")]
        pw = pwd.getpwnam(OS_USER)
        for dirpath, dirnames, filenames in os.walk(root):
            if os.path.basename(dirpath) == "etcd" and dirpath == os.path.join(root, "etcd"):
                dirnames[:] = []
                continue
            for p in [dirpath] + [os.path.join(dirpath, x) for x in filenames]:
                os.chown(p, pw.pw_uid, pw.pw_gid)
        chk = subprocess.run([SETPRIV, "--reuid=" + OS_USER, "--regid=" + OS_USER, "--init-groups",
                              "test", "-w", self.members[0].dir], env=child_env())
        if chk.returncode != 0:
            raise CheckFailed("user %s cannot write %s (is every parent of --workdir "
                              "traversable by it? /root is not)" % (OS_USER, self.members[0].dir))

        # 1. bootstrap ----------------------------------------------------
        t0 = time.monotonic()
        for m in self.members:
            m.start()
        primary, reps = self.wait_topology(a.bootstrap_timeout, "one primary and one replica after bootstrap")
        replica = reps[0]
        self.check_streaming(primary, replica)
        self.summary["bootstrap_s"] = round(time.monotonic() - t0, 2)
        log("bootstrap done in %.1fs: primary %s, replica %s"
            % (self.summary["bootstrap_s"], primary.name, replica.name))

        # 2. failover 1: SIGTERM to the primary's Patroni --------------------
        old, new = primary, replica
        log("failover 1: SIGTERM to %s patroni (pid %d)" % (old.name, old.proc.pid))
        t0 = time.monotonic()
        old.signal(signal.SIGTERM)
        self.summary["failover1_sigterm_s"] = self.wait_promoted(
            new, t0, "%s to become primary after SIGTERM to %s" % (new.name, old.name))
        log("failover 1: %s primary after %.2fs" % (new.name, self.summary["failover1_sigterm_s"]))
        if not old.wait_exit(60):
            raise CheckFailed("%s patroni did not exit within 60s of SIGTERM" % old.name)
        if old.postmaster_pid():
            raise CheckFailed("%s postmaster still running after its patroni exited on SIGTERM" % old.name)
        t0 = time.monotonic()
        old.start()
        wait_until("%s to rejoin as replica" % old.name, lambda: old.role() == "replica",
                   a.rejoin_timeout, interval=0.5)
        if new.role() != "primary":
            raise CheckFailed("%s lost the primary role while %s rejoined" % (new.name, old.name))
        self.check_streaming(new, old)
        self.summary["rejoin1_s"] = round(time.monotonic() - t0, 2)

        # 3. failover 2: SIGKILL to the primary's Patroni --------------------
        old, new = new, old
        pm = old.postmaster_pid()
        if not pm:
            raise CheckFailed("cannot find %s's postmaster before failover 2" % old.name)
        log("failover 2: SIGKILL to %s patroni (pid %d); postmaster pid %d"
            % (old.name, old.proc.pid, pm))
        t0 = time.monotonic()
        old.signal(signal.SIGKILL)
        old.wait_exit(10)
        time.sleep(0.5)
        orphan = old.postmaster_pid()
        self.summary["orphan_postmaster_alive"] = bool(orphan)
        self.summary["orphan_accepts_writes"] = None
        if orphan:
            # Still a primary, outside any HA control.
            self.summary["orphan_accepts_writes"] = psql(
                old.pg_port, "SELECT NOT pg_is_in_recovery()") == "t"
            log("orphaned postmaster %d still running (primary: %s)"
                % (orphan, self.summary["orphan_accepts_writes"]))
            if a.orphan == "kill":
                old.kill_postgres()
                wait_until("orphaned postmaster to die", lambda: not old.postmaster_pid(), 15)
                log("killed orphaned postmaster (whole-node crash)")
        self.summary["failover2_kill9_s"] = self.wait_promoted(
            new, t0, "%s to become primary after SIGKILL to %s" % (new.name, old.name))
        log("failover 2: %s primary after %.2fs" % (new.name, self.summary["failover2_kill9_s"]))
        t0 = time.monotonic()
        old.start()
        wait_until("%s to rejoin as replica after SIGKILL" % old.name, lambda: old.role() == "replica",
                   a.rejoin_timeout, interval=0.5)
        if new.role() != "primary":
            raise CheckFailed("%s lost the primary role while %s rejoined" % (new.name, old.name))
        self.check_streaming(new, old)
        self.summary["rejoin2_s"] = round(time.monotonic() - t0, 2)
        # Patroni logs "pg_rewind exit code=N" once per pg_rewind run.
        self.summary["pg_rewind_runs"] = sum(m.log_tail(1000000).count("pg_rewind exit code=")
                                             for m in self.members)

    def cleanup(self):
        # Graceful first (Patroni stops its postgres), then SIGKILL everything.
        for m in self.members:
            m.signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for m in self.members:
            if m.proc is not None:
                m.wait_exit(max(0.1, deadline - time.monotonic()))
        for m in self.members:
            m.cleanup()
        if self.etcd is None and self.summary.get("scope") and not self.args.keep_dcs_keys:
            delete_dcs_keys(self.args.dcs, self.args.dcs_addr, self.summary["scope"],
                            [m.name for m in self.members] if self.args.register_service else ())
        if self.etcd is not None:
            self.etcd.cleanup()
        left = [m.name for m in self.members if m.running() or m.postmaster_pid()]
        if left:
            log("WARNING: processes of %s still alive after cleanup" % left)
        if not self.args.keep_workdir:
            for sub in ("pg1", "pg2", "etcd"):
                shutil.rmtree(os.path.join(os.path.abspath(self.args.workdir), sub), ignore_errors=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dcs", choices=("consul", "etcd3"), required=True)
    p.add_argument("--dcs-addr", required=True, help="HOST:PORT of the DCS HTTP API (loopback only)")
    p.add_argument("--workdir", required=True, help="scratch dir (must be reachable by user postgres)")
    p.add_argument("--ttl", type=int, default=20,
                   help="Patroni ttl; with consul the session TTL is ttl/2 (must be 10..86400s)")
    p.add_argument("--loop-wait", type=int, default=2)
    p.add_argument("--retry-timeout", type=int, default=None,
                   help="default: min(10, (ttl - loop_wait) // 2 - 1)")
    p.add_argument("--scope", default=None, help="default: mwdemo-<time>-<pid>")
    p.add_argument("--orphan", choices=("kill", "keep"), default="kill",
                   help="after kill -9 of Patroni: SIGKILL the orphaned postmaster too (node crash) "
                        "or leave it for the restarted Patroni to demote")
    p.add_argument("--start-etcd", action="store_true",
                   help="start a throwaway etcd on --dcs-addr (validation without Meshwork)")
    p.add_argument("--register-service", action="store_true",
                   help="consul only: Patroni registers a service per member (agent/service/register)")
    p.add_argument("--consistency", choices=("default", "consistent", "stale"), default="default",
                   help="consul only: Patroni's read consistency mode")
    p.add_argument("--bootstrap-timeout", type=float, default=90)
    p.add_argument("--rejoin-timeout", type=float, default=90)
    p.add_argument("--keep-workdir", action="store_true", help="leave data dirs and logs behind")
    p.add_argument("--keep-dcs-keys", action="store_true", help="do not delete service/<scope>/ at the end")
    a = p.parse_args()
    host = a.dcs_addr.rsplit(":", 1)[0]
    if not (host.startswith("127.") or host == "localhost"):
        p.error("--dcs-addr must be on 127.0.0.0/8")
    if a.retry_timeout is None:
        a.retry_timeout = max(2, min(10, (a.ttl - a.loop_wait) // 2 - 1))
    if a.loop_wait + 2 * a.retry_timeout > a.ttl:
        p.error("need loop_wait + 2*retry_timeout <= ttl (Patroni's rule)")
    if a.dcs == "consul" and not (10 <= a.ttl / 2.0 <= 86400):
        p.error("with consul Patroni creates sessions with TTL ttl/2; need 20 <= --ttl <= 172800")
    return a


def main():
    args = parse_args()
    if os.geteuid() != 0:
        print("patroni_check: must run as root (it switches to user %s)" % OS_USER, file=sys.stderr)
        return 2
    for path in (PATRONI, SETPRIV, PSQL, os.path.join(PG_BIN, "postgres")) + ((ETCD,) if args.start_etcd else ()):
        if not os.path.exists(path):
            print("patroni_check: missing %s (see tests/clients/PATRONI.md for packages)" % path,
                  file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    h = Harness(args)
    t0 = time.monotonic()
    ok = False
    try:
        h.run()
        ok = True
    except CheckFailed as e:
        print("patroni_check: FAILED: %s" % e, file=sys.stderr)
    except (KeyboardInterrupt, Interrupted) as e:
        print("patroni_check: interrupted (%s)" % (e or "SIGINT"), file=sys.stderr)
    finally:
        # No interruption of the cleanup itself.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if not ok:
            for m in h.members:
                print("---- %s log tail (%s) ----\n%s" % (m.name, m.logfile, m.log_tail()), file=sys.stderr)
            if not args.keep_workdir:
                args.keep_workdir = True  # keep logs of a failed run
                print("patroni_check: logs kept under %s" % os.path.abspath(args.workdir), file=sys.stderr)
        h.cleanup()
    h.summary["total_s"] = round(time.monotonic() - t0, 2)
    h.summary["result"] = "pass" if ok else "fail"
    print(json.dumps(h.summary, sort_keys=True), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
