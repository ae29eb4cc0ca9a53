#!/usr/bin/env python3
"""Writes the Grafana dashboards (registry.json, mesh.json) from the panel
lists below: edit here, run `python3 deploy-vm/grafana/make.py`, commit
both. Every expression is run against a real Prometheus scraping a
registry and sidecars by tests/tests/dashboards.rs. `$__rate_interval` is
Grafana's; `$datasource` picks the Prometheus data source."""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(i, title, exprs, unit="short", kind="timeseries", legend=None):
    targets = [
        {"refId": chr(65 + n), "datasource": DS, "expr": e, "legendFormat": (legend or [""] * len(exprs))[n]}
        for n, e in enumerate(exprs)
    ]
    return {
        "id": i,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"x": (i - 1) % 2 * 12, "y": (i - 1) // 2 * 8, "w": 12, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": targets,
    }


def dashboard(uid, title, panels):
    return {
        "uid": uid,
        "title": title,
        "tags": ["meshwork"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [{
            "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0,
        }]},
        "panels": [panel(i + 1, *p) for i, p in enumerate(panels)],
    }


REGISTRY = [
    ("Leader (per server)", ["meshwork_raft_is_leader"], "short", "timeseries", ["{{instance}}"]),
    ("Raft term and leader changes", ["max(meshwork_raft_term)", "sum(increase(meshwork_raft_leader_changes_total[$__rate_interval]))"], "short", "timeseries", ["term", "leader changes"]),
    ("Applied index lag behind the leader's log", ["scalar(max(meshwork_raft_last_log_index)) - meshwork_raft_applied_index"], "short", "timeseries", ["{{instance}}"]),
    ("Write latency p50 / p99", [
        "histogram_quantile(0.5, sum by (le) (rate(meshwork_raft_write_duration_seconds_bucket[$__rate_interval])))",
        "histogram_quantile(0.99, sum by (le) (rate(meshwork_raft_write_duration_seconds_bucket[$__rate_interval])))"], "s", "timeseries", ["p50", "p99"]),
    ("Apply latency p99", ["histogram_quantile(0.99, sum by (le, instance) (rate(meshwork_raft_apply_duration_seconds_bucket[$__rate_interval])))"], "s", "timeseries", ["{{instance}}"]),
    ("Writes per second", ["sum(rate(meshwork_raft_write_duration_seconds_count[$__rate_interval]))"], "ops", "timeseries", ["writes"]),
    ("HTTP requests per second", ["sum by (instance) (rate(meshwork_http_request_duration_seconds_count[$__rate_interval]))"], "reqps", "timeseries", ["{{instance}}"]),
    ("Blocking queries parked", ["sum by (instance) (meshwork_blocking_queries)"], "short", "timeseries", ["{{instance}}"]),
    ("Watch stream subscribers", ["sum by (instance) (meshwork_watch_subscribers)"], "short", "timeseries", ["{{instance}}"]),
    ("DNS answers per second", ["sum by (instance) (rate(meshwork_dns_answers_total[$__rate_interval]))"], "reqps", "timeseries", ["{{instance}}"]),
    ("DNS cache hit ratio", ["sum(rate(meshwork_dns_cache_hits_total[$__rate_interval])) / clamp_min(sum(rate(meshwork_dns_cache_hits_total[$__rate_interval])) + sum(rate(meshwork_dns_cache_misses_total[$__rate_interval])), 1e-9)"], "percentunit", "timeseries", ["hits"]),
    ("Catalog and KV size", ["max(meshwork_catalog_services)", "max(meshwork_catalog_nodes)", "max(meshwork_kv_keys)"], "short", "timeseries", ["services", "nodes", "keys"]),
]

MESH = [
    ("Requests per second by service (inbound)", ["sum by (upstream) (rate(meshwork_proxy_requests_total{direction=\"inbound\"}[$__rate_interval]))"], "reqps", "timeseries", ["{{upstream}}"]),
    # A service without a 5xx has no 5xx series: `or ... * 0` shows it at 0.
    ("Error ratio by service (inbound, 5xx)", ["(sum by (upstream) (rate(meshwork_proxy_requests_total{direction=\"inbound\",class=\"5xx\"}[$__rate_interval])) or sum by (upstream) (rate(meshwork_proxy_requests_total{direction=\"inbound\"}[$__rate_interval])) * 0) / clamp_min(sum by (upstream) (rate(meshwork_proxy_requests_total{direction=\"inbound\"}[$__rate_interval])), 1e-9)"], "percentunit", "timeseries", ["{{upstream}}"]),
    ("Latency p99 by service (inbound)", ["histogram_quantile(0.99, sum by (le, upstream) (rate(meshwork_proxy_request_duration_seconds_bucket{direction=\"inbound\"}[$__rate_interval])))"], "s", "timeseries", ["{{upstream}}"]),
    ("Calls per second by edge (caller → upstream)", ["sum by (service, upstream) (rate(meshwork_proxy_requests_total{direction=\"outbound\"}[$__rate_interval]))"], "reqps", "timeseries", ["{{service}} → {{upstream}}"]),
    ("Edge latency p50 / p99", [
        "histogram_quantile(0.5, sum by (le, service, upstream) (rate(meshwork_proxy_request_duration_seconds_bucket{direction=\"outbound\"}[$__rate_interval])))",
        "histogram_quantile(0.99, sum by (le, service, upstream) (rate(meshwork_proxy_request_duration_seconds_bucket{direction=\"outbound\"}[$__rate_interval])))"], "s", "timeseries", ["p50 {{service}} → {{upstream}}", "p99 {{service}} → {{upstream}}"]),
    ("Proxy outcomes other than the upstream's answer", ["sum by (upstream, outcome) (rate(meshwork_proxy_requests_total{outcome!=\"upstream\"}[$__rate_interval])) or label_replace(sum by (upstream) (rate(meshwork_proxy_requests_total[$__rate_interval])) * 0, \"outcome\", \"none\", \"\", \"\")"], "reqps", "timeseries", ["{{upstream}} {{outcome}}"]),
    ("Retries and ejections", ["sum by (upstream) (rate(meshwork_proxy_retries_total[$__rate_interval]))", "sum by (upstream) (increase(meshwork_proxy_ejections_total[$__rate_interval]))"], "short", "timeseries", ["retries {{upstream}}", "ejections {{upstream}}"]),
    ("Healthy endpoints per upstream", ["min by (service, upstream) (meshwork_proxy_endpoints_healthy{direction=\"outbound\"})"], "short", "timeseries", ["{{service}} → {{upstream}}"]),
    ("Sidecars connected to the registry", ["sum(meshwork_sidecar_registry_connected)", "count(meshwork_sidecar_registry_connected)"], "short", "stat", ["connected", "sidecars"]),
    ("Leaf certificate time left (min)", ["min by (service) (meshwork_sidecar_leaf_expiry_seconds)"], "s", "timeseries", ["{{service}}"]),
    ("Intention decisions", ["sum by (decision) (rate(meshwork_sidecar_intention_decisions_total[$__rate_interval]))"], "reqps", "timeseries", ["{{decision}}"]),
    ("Active requests and connections", ["sum by (service) (meshwork_proxy_requests_active)", "sum by (service) (meshwork_proxy_downstream_connections_active)"], "short", "timeseries", ["requests {{service}}", "connections {{service}}"]),
]

here = os.path.dirname(os.path.abspath(__file__))
for name, uid, title, panels in [
    ("registry.json", "meshwork-registry", "Meshwork registry", REGISTRY),
    ("mesh.json", "meshwork-mesh", "Meshwork mesh", MESH),
]:
    with open(os.path.join(here, name), "w") as f:
        json.dump(dashboard(uid, title, panels), f, indent=2)
        f.write("\n")
