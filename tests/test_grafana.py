"""The Grafana dashboard, its provisioning and Prometheus's scrape config, checked statically.

No Docker engine here, so: the dashboard JSON's shape (unique panel ids, grid positions, every
target on the provisioned datasource), every metric its queries name against what a live router
really exports (a real router, cost policy, in front of two real simulated backends, after a
streamed and a non-streamed request, scraped over HTTP), the provisioning files against the
compose mounts, and the scrape targets against the compose services and ports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_compose import _interpolate

from tests.server_fixtures import serving

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy/grafana/dashboards/prefix-router.json"
DATASOURCES = REPO / "deploy/grafana/provisioning/datasources/prometheus.yml"
PROVIDERS = REPO / "deploy/grafana/provisioning/dashboards/prefix-router.yml"
SCRAPE = REPO / "deploy/prometheus/prometheus.yml"
_METRIC = re.compile(r"\bprefix_router_[a-z_]+\b")


def _yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = _interpolate(_yaml(REPO / "docker-compose.yml"))
    svcs: dict[str, dict[str, Any]] = compose["services"]
    return svcs


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    assert dashboard["uid"] and dashboard["title"] == "prefix-router"
    assert [p["id"] for p in panels] == list(range(1, len(panels) + 1))
    uid = _yaml(DATASOURCES)["datasources"][0]["uid"]
    cells: set[tuple[int, int]] = set()
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        cell = (grid["x"], grid["y"])
        assert cell not in cells, f"{p['title']} overlaps another panel"
        cells.add(cell)
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("routing decisions", "hit ratio", "learned", "regret", "ttft"):
        assert topic in titles, topic


async def test_dashboard_queries_name_metrics_the_router_exports(
    dashboard: dict[str, Any],
) -> None:
    async with serving(2, policy="cost") as s:
        body = {"input_ids": list(range(300)), "sampling_params": {"max_new_tokens": 4}}
        for stream in (False, True):
            async with s.session.post(f"{s.url}/generate", json={**body, "stream": stream}) as resp:
                assert resp.status == 200
                await resp.read()
        async with s.session.get(f"{s.url}/metrics") as resp:
            text = await resp.text()
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    types = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    # a labelled family with no series yet (no error happened) is declared, not sampled
    exported = samples | types
    assert "prefix_router_ttft_regret_seconds_bucket" in samples  # the requests were seen
    named = {m for expr in _exprs(dashboard) for m in _METRIC.findall(expr)}
    assert named, "the dashboard queries no prefix_router metric"
    assert named <= exported, f"not exported: {sorted(named - exported)}"
    # every series family the router exports has a panel (a new metric needs one)
    families = {
        m.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for m in named
    }
    assert types <= families | {"prefix_router_predicted_cached_tokens_total"}, sorted(
        types - families
    )


def test_provisioning_matches_the_compose_mounts(services: dict[str, dict[str, Any]]) -> None:
    grafana, prometheus = services["grafana"], services["prometheus"]
    mounts = {v.split(":")[1]: REPO / v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == DATASOURCES.parent.parent
    (provider,) = _yaml(PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(Path(home).parent)] / Path(home).name == DASHBOARD
    (source,) = _yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert prometheus["volumes"] == [
        f"./{SCRAPE.relative_to(REPO)}:/etc/prometheus/prometheus.yml:ro"
    ]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "router-cpu" in prometheus["depends_on"]
    for svc in (grafana, prometheus):
        assert svc["profiles"] == ["cpu"] and svc.get("healthcheck")


def test_scrape_config_targets_the_stack(services: dict[str, dict[str, Any]]) -> None:
    jobs = {job["job_name"]: job for job in _yaml(SCRAPE)["scrape_configs"]}
    assert set(jobs) == {"prefix-router", "sglang"}
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"
        for target in job["static_configs"][0]["targets"]:
            host, _, port = target.partition(":")
            assert port in services[host].get("expose", []) or any(
                p.endswith(f":{port}") for p in services[host].get("ports", [])
            ), target
    assert jobs["prefix-router"]["static_configs"][0]["targets"] == ["router-cpu:30000"]
    # the router listens where Prometheus looks
    command = services["router-cpu"]["command"]
    assert command[command.index("--port") + 1] == "30000"
