"""What an admin copies from deploy/ is checked here, offline (no container runtime on these machines).

- the Compose file validates against the Compose specification's JSON schema (the copy
  vendored in PyPI ``check-jsonschema``);
- every setting the files pass to the node (its TOML file and the ``CXRNODE_*`` environment) is
  a valid cxrnode setting, and the node, Orthanc, Prometheus and Grafana agree on names and ports;
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
                          str(COMPOSE_DIR / "compose.yaml")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text((COMPOSE_DIR / "compose.yaml").read_text().replace("    restart: on-failure",
                                                                          "    restart: [on-failure]", 1))
    run = subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(broken)],
                         capture_output=True, text=True, timeout=120)
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


def test_grafana_dashboard_queries_metrics_the_node_exports() -> None:
    from node.http import metrics

    exported = metrics.metric_names()
    dashboard = json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "cxrnode.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 6
    for expr in exprs:
        names = {n for n in re.findall(r"\b(cxrnode_[a-z0-9_]+)", expr)}
        assert names, expr
        for name in names:
            base = re.sub(r"_(bucket|count|sum|total|info|created)$", "", name)
            assert name in exported or base in exported, f"{name} in {expr!r} is not exported"


@pytest.mark.parametrize("unit", ["cxrnode.service", "cxrnode-worker.service"])
def test_systemd_units_restart_on_a_failing_exit(unit: str) -> None:
    text = (REPO / "deploy" / unit).read_text()
    assert re.search(r"^Restart=on-failure$", text, re.M)
    assert re.search(r"^ExecStart=\S+/cxrnode (serve|worker)\b", text, re.M)
    assert "SuccessExitStatus" not in text or "75" not in text.split("SuccessExitStatus")[1].split("\n")[0]
