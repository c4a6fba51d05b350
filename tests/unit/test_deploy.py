"""What an admin copies from deploy/ is checked here, offline (no container runtime on these machines).

- the Compose file validates against the Compose specification's JSON schema (the copy
  vendored in PyPI ``check-jsonschema``);
- every setting the files pass to the node (its TOML file and the ``CXRNODE_*`` environment) is
  a valid cxrnode setting, and the node, Orthanc, Prometheus and Grafana agree on names and ports;
- the alerting rules query only what the node exports, pass ``promtool check``, and their
  ``promtool test rules`` unit tests (``tests/unit/data/alerts_test.yml``) pass: promtool is
  required (Debian package ``prometheus``; ``scripts/test`` installs it);
- the systemd units run the node the way its exit codes expect.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from node.errors import SettingsError
from node.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"


def yaml_file(path: Path) -> dict:
    return YAML(typ="safe").load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml_file(COMPOSE_DIR / "compose.yaml")


def node_settings(compose: dict):  # type: ignore[no-untyped-def]
    """The node's settings as the container would load them: its mounted file + its environment."""
    service = compose["services"]["cxrnode"]
    env = {k: str(v) for k, v in service["environment"].items()}
    mounts = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    config = mounts[env.pop("CXRNODE_CONFIG")]
    return load_settings(config, env=env), env


def check_jsonschema() -> str:
    found = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    assert Path(found).exists(), "check-jsonschema (test dependency) is not installed"
    return found


def test_compose_file_follows_the_compose_specification() -> None:
    run = subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec",
                          str(COMPOSE_DIR / "compose.yaml")],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text((COMPOSE_DIR / "compose.yaml").read_text().replace("    restart: on-failure",
                                                                          "    restart: [on-failure]", 1))
    run = subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(broken)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0


def test_every_setting_passed_to_the_node_is_valid(compose: dict) -> None:
    settings, env = node_settings(compose)
    assert env, "the compose file passes settings through the environment"
    assert str(settings.data_path) == "/data"
    assert settings.http.enabled and settings.http.host == "0.0.0.0"
    service = compose["services"]["cxrnode"]
    assert any(v.endswith(":/data") for v in service["volumes"]), "the data folder is a named volume"
    assert any(v.split(":")[0] in compose["volumes"] for v in service["volumes"])
    published = {p.rsplit(":", 1)[-1]: p for p in service["ports"]}
    assert str(settings.node.port) in published
    assert published[str(settings.http.port)].startswith("127.0.0.1:"), "the admin page stays on loopback"


def test_a_wrong_setting_in_the_environment_is_refused(compose: dict) -> None:
    broken = copy.deepcopy(compose)
    service = broken["services"]["cxrnode"]
    service["environment"] = dict(service["environment"], CXRNODE_HTTP_PROT="8480")
    with pytest.raises(SettingsError, match="CXRNODE_HTTP_PROT"):
        node_settings(broken)


def test_node_pacs_and_monitoring_agree(compose: dict) -> None:
    settings, _ = node_settings(compose)
    (dest,) = settings.destinations
    orthanc = json.loads((COMPOSE_DIR / "orthanc.json").read_text())
    assert dest.host == "orthanc" and dest.ae_title == orthanc["DicomAet"] and dest.port == 4242
    assert orthanc["DicomModalities"]["cxrnode"] == [settings.node.ae_title, "cxrnode", settings.node.port]
    assert orthanc["DicomAet"] in settings.node.allowed_calling_ae_titles
    orthanc_service = compose["services"]["orthanc"]
    mounted = {v.split(":")[1]: (COMPOSE_DIR / v.split(":")[0]).resolve()
               for v in orthanc_service["volumes"] if v.startswith(".")}
    for script in orthanc["LuaScripts"]:
        assert mounted[script] == (REPO / "deploy" / "orthanc" / "route-to-cxrnode.lua").resolve()

    prometheus = yaml_file(COMPOSE_DIR / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"cxrnode:{settings.http.port}"]


def exported_metrics_in(expr: str, exported: frozenset[str]) -> set[str]:
    """The ``cxrnode_*`` metrics ``expr`` (PromQL) names, each checked to be one the node exports."""
    names = {n for n in re.findall(r"\b(cxrnode_[a-z0-9_]+)", expr)}
    for name in names:
        base = re.sub(r"_(bucket|count|sum|total|info|created)$", "", name)
        assert name in exported or base in exported, f"{name} in {expr!r} is not exported"
    return names


def test_grafana_dashboard_queries_metrics_the_node_exports() -> None:
    from node.http import metrics

    exported = metrics.metric_names()
    dashboard = json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "cxrnode.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 6
    for expr in exprs:
        assert exported_metrics_in(expr, exported), expr
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    titles = {panel["title"]: panel for panel in dashboard["panels"]}
    (target,) = titles["Lung segmentations, by plausibility"]["targets"]
    assert "by (plausibility)" in target["expr"]


ALERTS = COMPOSE_DIR / "alerts.yml"
ALERT_TESTS = REPO / "tests" / "unit" / "data" / "alerts_test.yml"


def promtool() -> str:
    """The promtool binary: required, never skipped (CI installs it with scripts/test)."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: it comes with the Debian package prometheus "
                    "(`apt-get install prometheus`; scripts/test installs it)", pytrace=False)
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], check=False, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    return [rule for group in yaml_file(ALERTS)["groups"] for rule in group["rules"]]


def test_alert_rules_query_metrics_the_node_exports() -> None:
    from node.dicom import Status
    from node.http import metrics
    from node.queue.states import JobStatus

    exported = metrics.metric_names()
    rules = alert_rules()
    assert all("alert" in rule for rule in rules), "alerting rules only (no recording rules)"
    scrape_jobs = {job["job_name"] for job in yaml_file(COMPOSE_DIR / "prometheus.yml")["scrape_configs"]}
    statuses = {f"0x{code:04X}" for name, code in vars(Status).items() if name.isupper()} | {"exception"}
    known_values = {"plausibility": set(metrics.PLAUSIBILITY_LABELS), "state": {s.value for s in JobStatus},
                    "status": statuses, "job": scrape_jobs}
    for rule in rules:
        expr = rule["expr"]
        # every selector with matchers is a metric the node exports or Prometheus's own `up`
        selected = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
        assert exported_metrics_in(expr, exported) or selected == {"up"}, expr
        for name in selected:
            assert name.startswith("cxrnode_") or name == "up", f"{name} in {rule['alert']}"
        # label values the node (or the scrape config) really produces
        for label, value in re.findall(r"\b(plausibility|state|status|job)=~?\"([^\"]*)\"", expr):
            for one in value.split("|"):
                assert one in known_values[label], f"{label}={one!r} in {rule['alert']} is never exported"
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), f"{rule['alert']} has a for: duration"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    text = ALERTS.read_text()
    assert 'up{job="cxrnode"} == 0' in text
    assert 'cxrnode_lung_segmentations_total{plausibility="implausible"}' in text
    for command in ("cxrnode status", "cxrnode jobs list --state failed", "cxrnode jobs retry"):
        assert command in text, f"the descriptions name `{command}`"


def test_prometheus_loads_the_alert_rules_where_compose_mounts_them(compose: dict) -> None:
    prometheus = yaml_file(COMPOSE_DIR / "prometheus.yml")
    assert prometheus["rule_files"] == ["alerts.yml"]
    service = compose["services"]["prometheus"]
    (config,) = [arg.split("=", 1)[1] for arg in service["command"] if arg.startswith("--config.file=")]
    mounts = {v.split(":")[1]: (COMPOSE_DIR / v.split(":")[0]).resolve()
              for v in service["volumes"] if v.startswith(".")}
    assert mounts[config] == (COMPOSE_DIR / "prometheus.yml").resolve()
    # rule_files are resolved against the config file's folder
    assert mounts[str(Path(config).parent / "alerts.yml")] == ALERTS.resolve()

    rules = run_promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout + rules.stderr
    config_check = run_promtool("check", "config", str(COMPOSE_DIR / "prometheus.yml"))
    assert config_check.returncode == 0, config_check.stdout + config_check.stderr
    assert "1 rule files found" in config_check.stdout + config_check.stderr


def test_alert_rules_unit_tests_pass() -> None:
    """promtool test rules: on synthetic series, each alert fires when it must and not otherwise
    (the implausible-segmentation share for a burst, not for an occasional one; node down; disk)."""
    tests = yaml_file(ALERT_TESTS)
    assert [(ALERT_TESTS.parent / f).resolve() for f in tests["rule_files"]] == [ALERTS.resolve()]
    cases = [case for group in tests["tests"] for case in group["alert_rule_test"]]
    for rule in alert_rules():
        expected = [case["exp_alerts"] for case in cases if case["alertname"] == rule["alert"]]
        assert any(expected), f"{rule['alert']}: no test where it fires"
        assert [] in expected, f"{rule['alert']}: no test where it does not fire"
    run = run_promtool("test", "rules", str(ALERT_TESTS))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def test_the_alert_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The unit tests are not vacuous: with the implausible share's threshold at 50 % instead of
    20 %, the burst (37.5 %) no longer fires and promtool says so."""
    text = ALERTS.read_text()
    assert text.count("          > 0.2\n") == 1
    (tmp_path / "alerts.yml").write_text(text.replace("          > 0.2\n", "          > 0.5\n"))
    tests = ALERT_TESTS.read_text().replace("  - ../../../deploy/compose/alerts.yml\n", "  - alerts.yml\n")
    (tmp_path / "alerts_test.yml").write_text(tests)
    run = run_promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert run.returncode != 0
    assert "alertname: CxrnodeImplausibleLungSegmentations" in run.stdout + run.stderr


@pytest.mark.parametrize("unit", ["cxrnode.service", "cxrnode-worker.service"])
def test_systemd_units_restart_on_a_failing_exit(unit: str) -> None:
    text = (REPO / "deploy" / unit).read_text()
    assert re.search(r"^Restart=on-failure$", text, re.MULTILINE)
    assert re.search(r"^ExecStart=\S+/cxrnode (serve|worker)\b", text, re.MULTILINE)
    assert "SuccessExitStatus" not in text or "75" not in text.split("SuccessExitStatus")[1].split("\n")[0]
