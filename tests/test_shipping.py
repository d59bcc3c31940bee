"""The shipping files are checked by their own tools: hadolint, the Kubernetes schemas,
docker-compose and promtool; the wheel holds what ``pip install .`` must give."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, require_system_tool

DOCKER = REPO / "docker"
MANIFESTS = sorted(p for p in (DOCKER / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    r = run(str(hadolint), "--failure-threshold", "info", str(DOCKER / "Dockerfile"))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    assert len(MANIFESTS) == 4
    cli = Path(sys.executable).parent / "kubernetes-validate"
    r = run(str(cli), "--strict", "-k", version, *map(str, MANIFESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == len(MANIFESTS)


def test_kustomization_lists_every_manifest() -> None:
    text = (DOCKER / "k8s" / "kustomization.yaml").read_text()
    assert all(f"- {m.name}" in text for m in MANIFESTS)


def test_deployment_drains_before_it_is_killed() -> None:
    """The grace period covers preStop plus the service's own drain timeout."""
    import yaml

    dep = yaml.safe_load((DOCKER / "k8s" / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["U2SERVE_DRAIN_TIMEOUT_S"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_service_links_cannot_shadow_settings() -> None:
    """A Service named u2serve would inject U2SERVE_PORT=tcp://… into every pod."""
    import yaml

    dep = yaml.safe_load((DOCKER / "k8s" / "deployment.yaml").read_text())
    svc = yaml.safe_load((DOCKER / "k8s" / "service.yaml").read_text())
    assert svc["metadata"]["name"].upper().startswith("U2SERVE")
    assert dep["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_compose_file_is_accepted() -> None:
    compose = require_system_tool("docker-compose")
    r = run(compose, "-f", str(DOCKER / "compose.yaml"), "config", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(compose, "-f", str(DOCKER / "compose.yaml"), "config", "--services")
    assert set(r.stdout.split()) == {"u2serve-a", "u2serve-b", "nginx", "prometheus", "redis"}


def test_prometheus_config_is_accepted() -> None:
    promtool = require_system_tool("promtool")
    r = run(promtool, "check", "config", str(DOCKER / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    """Each alert fires on the series that should fire it, and not on the ones before."""
    promtool = require_system_tool("promtool")
    r = run(promtool, "check", "rules", str(DOCKER / "alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(promtool, "test", "rules", str(DOCKER / "alerts.test.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def _exported_metric_names() -> dict[str, str]:
    """Every series name the service's registry can export (labelled families included),
    with the family it belongs to."""
    from service.metrics import Metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    return {
        family.name + suffix: family.name
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }


def _named_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:u2serve|process)_[a-z_]+)\b", expr))


def test_every_dashboard_and_alert_query_names_an_exported_metric() -> None:
    import yaml

    exported = _exported_metric_names()
    dashboard = json.loads((DOCKER / "grafana" / "u2serve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(exprs) >= 15
    for expr in exprs:
        named = _named_metrics(expr)
        assert named, f"no service metric in {expr!r}"
        assert named <= exported.keys(), f"{sorted(named - exported.keys())} not exported: {expr!r}"
    # And every metric the service exports is on the dashboard.
    shown = {exported[n] for e in exprs for n in _named_metrics(e)}
    missing = {f for f in exported.values() if f.startswith("u2serve_")} - shown
    assert not missing, f"not on the dashboard or in an alert: {sorted(missing)}"


PACKAGES = ("u2serve", "service", "model", "weights")
REQUIREMENTS = ("requirements.txt", "requirements-convert.txt", "requirements-gpu.txt")


def wheel_of(folder: Path) -> Path:
    """The project's wheel, built into ``folder`` from a copy of its sources (so that nothing is
    written into the working tree)."""
    src = folder / "src"
    for name in ("pyproject.toml", "README.md", *REQUIREMENTS):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = folder / "dist"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(built), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = built.glob("u2serve-*.whl")
    return wheel


def test_the_wheel_holds_the_public_package_and_the_command(tmp_path: Path) -> None:
    """``pip install .`` gives ``import u2serve`` (typed) beside the packages it is the face of,
    and the ``u2serve`` command. Built from a copy of the sources, so nothing is left behind in
    the working tree."""
    wheel = wheel_of(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.removeprefix("Requires-Dist: ")
            for line in zf.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist: ")
        ]
    # The default dependencies are a CPU host's; PyTorch comes with the gpu extra alone.
    torch = [r for r in requires if r.startswith("torch")]
    assert torch == ['torch==2.13.0; extra == "gpu"'], requires
    assert any(r.startswith("mnn") or r.startswith("MNN") for r in requires)
    for package in PACKAGES:
        sources = {
            p.relative_to(REPO).as_posix()
            for p in (REPO / package).rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert sources <= names, sorted(sources - names)
    assert "u2serve/py.typed" in names
    assert "u2serve = u2serve.cli:main" in scripts
