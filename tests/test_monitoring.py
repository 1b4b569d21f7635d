"""deploy/monitoring: the Prometheus scrape config, the alert rules and the Grafana dashboard
use only metrics a running gateway really exports (and promtool accepts the rules, where it is
installed)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

MONITORING = Path(__file__).parent.parent / "deploy" / "monitoring"
RULES, SCRAPE = MONITORING / "esl-gateway-alerts.yml", MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "esl-gateway-dashboard.json"
METRIC = re.compile(r"\besl_gateway_[a-z_]+\b")
# What the rules must watch (issue 17): crash rate, a slot in backoff, the accept queue,
# /healthz and the drain, no worker ready.
WATCHED = {"esl_gateway_worker_deaths_per_minute", "esl_gateway_slot_backoff_seconds",
           "esl_gateway_listen_queue", "esl_gateway_healthy", "esl_gateway_draining",
           "esl_gateway_workers_ready"}


def rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in document["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in document["templating"]["list"]
                if "definition" in variable]
    return queries


def exported(gateway) -> set[str]:
    """Every metric family and sample name in the gateway's /metrics, parsed by Prometheus'
    own parser. Families without samples yet (the backoff gauge, exits by cause) count: their
    TYPE line is there, and a counter's samples are its name plus ``_total``."""
    status, body = gateway.http_get("/metrics")
    assert status == 200
    names = set()
    for family in text_string_to_metric_families(body.decode()):
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        names.update(sample.name for sample in family.samples)
    return names


def test_rules_and_dashboard_use_only_exported_metrics(start_gateway):
    gateway = start_gateway(workers=1)
    names = exported(gateway)
    for rule in rules():
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    used = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    shown = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    assert WATCHED <= used, WATCHED - used
    assert not (used | shown) - names, sorted((used | shown) - names)
    assert len(shown) >= 15


def test_scrape_config_loads_the_rules():
    config = yaml.safe_load(SCRAPE.read_text())
    assert [(MONITORING / path).exists() for path in config["rule_files"]] == [True]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "esl-gateway" and job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_the_config():
    for command in (["check", "rules", str(RULES)], ["check", "config", str(SCRAPE)]):
        done = subprocess.run(["promtool", *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
