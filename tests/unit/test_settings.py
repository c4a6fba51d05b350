from pathlib import Path

import pytest

from node.errors import SettingsError
from node.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_shipped_config_loads_with_documented_keys() -> None:
    settings = load_settings(REPO / "config" / "cxrnode.toml", env={})
    assert settings.node.ae_title == "CXRNODE"
    assert settings.node.port == 11112
    assert settings.node.data_dir == "var"
    (dest,) = settings.destinations
    assert (dest.ae_title, dest.host, dest.port) == ("ORTHANC", "127.0.0.1", 4242)


@pytest.mark.sqlite_only("compares [queue] url with its empty default, which the PostgreSQL pass fills in")
def test_shipped_config_lists_every_setting() -> None:
    """Every field of every section appears in config/cxrnode.toml (the documented defaults)."""
    import dataclasses
    import tomllib

    from node.settings import _SECTIONS

    shipped = tomllib.loads((REPO / "config" / "cxrnode.toml").read_text())
    for name, cls in _SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(shipped[name]) == fields, name
        assert load_settings(REPO / "config" / "cxrnode.toml", env={}).__getattribute__(name) == cls()


@pytest.mark.parametrize(("text", "key"), [
    ('[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n', "node.ae_title"),
    ("[node]\nport = 70000\n", "node.port"),
    ("[node]\nportt = 4\n", "node.portt"),
    ('[nodes]\nport = 4\n', "nodes"),
    ('[node]\nport = "x"\n', "node.port"),
    ('[[destinations]]\nae_title = "A"\nhost = "h"\nport = 0\n', "destinations.port"),
    ('[[destinations]]\nae_title = "A"\nport = 1\n', "destinations"),
    ('[worker]\narchitecture = "vit"\n', "worker.architecture"),
    ("[worker]\nconcurrency = 0\n", "worker.concurrency"),
    ('[send]\nbackoff_s = []\n', "send.backoff_s"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        load_settings(write(tmp_path, text), env={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 4000\n")
    settings = load_settings(path, env={"CXRNODE_NODE_PORT": "4001", "CXRNODE_SEND_BACKOFF_S": "1,2.5",
                                        "CXRNODE_NODE_ALLOWED_CALLING_AE_TITLES": "A,B"})
    assert settings.node.port == 4001
    assert settings.send.backoff_s == (1.0, 2.5)
    assert settings.node.allowed_calling_ae_titles == ("A", "B")


def test_unknown_environment_variable_is_refused() -> None:
    with pytest.raises(SettingsError, match="CXRNODE_NODE_PROT"):
        load_settings(None, env={"CXRNODE_NODE_PROT": "1"})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_backoff_repeats_its_last_delay() -> None:
    send = load_settings(None, env={"CXRNODE_SEND_BACKOFF_S": "1,5"}).send
    assert [send.delay_after(n) for n in (1, 2, 3, 9)] == [1.0, 5.0, 5.0, 5.0]


# ----- [queue] url: SQLite by default, PostgreSQL by URL, the password never shown -----

PG_URL = "postgresql+psycopg://cxrnode:s3cret-pass@db.example.org:5432/cxrnode"


@pytest.mark.sqlite_only("compares [queue] url with its empty default, which the PostgreSQL pass fills in")
def test_the_queue_is_the_sqlite_file_unless_a_url_names_postgresql(tmp_path: Path) -> None:
    assert load_settings(None, env={}).queue.url == ""
    settings = load_settings(write(tmp_path, f'[queue]\nurl = "{PG_URL}"\n'), env={})
    assert settings.queue.url == PG_URL
    assert load_settings(None, env={"CXRNODE_QUEUE_URL": f" {PG_URL} "}).queue.url == PG_URL
    assert settings.queue.masked_url == "postgresql+psycopg://cxrnode:***@db.example.org:5432/cxrnode"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize("url", [
    "mysql://cxrnode:s3cret-pass@db/cxrnode",
    "postgresql://cxrnode:s3cret-pass@db/cxrnode",  # psycopg2's scheme: not installed
    "sqlite:///var/queue.sqlite3",
    "cxrnode:s3cret-pass@db/cxrnode",
    "postgresql+psycopg://cxrnode:s3cret-pass@db:port/cxrnode",
    "postgresql+psycopg://cxrnode:s3cret-pass@db:5432/",
])
def test_a_queue_url_that_is_not_postgresql_is_refused_in_one_line_without_the_password(url: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(None, env={"CXRNODE_QUEUE_URL": url})
    message = str(refused.value)
    assert message.startswith("queue.url: ") and "\n" not in message
    assert "s3cret" not in message


def test_config_check_masks_the_queue_password(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    config = write(tmp_path, f'[queue]\nurl = "{PG_URL}"\n')
    for extra in ([], ["--json"]):
        done = subprocess.run([sys.executable, "-m", "node", "config", "check", "--config", str(config), *extra],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "s3cret" not in done.stdout + done.stderr
    assert json.loads(done.stdout)["queue"]["url"] == "postgresql+psycopg://cxrnode:***@db.example.org:5432/cxrnode"


def test_an_unreachable_queue_is_one_line_from_the_cli_without_the_password(tmp_path: Path) -> None:
    """``cxrnode status`` against a PostgreSQL nobody listens on: one readable line, exit 1."""
    import subprocess
    import sys

    from tests.servers import free_port

    url = f"postgresql+psycopg://cxrnode:s3cret-pass@127.0.0.1:{free_port()}/cxrnode"
    config = write(tmp_path, f'[node]\ndata_dir = "{tmp_path / "var"}"\n[queue]\nurl = "{url}"\n')
    done = subprocess.run([sys.executable, "-m", "node", "status", "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("cxrnode: error: the queue database cannot be used: OperationalError")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "s3cret" not in done.stdout + done.stderr


def test_log_lines_mask_a_database_password() -> None:
    from node.logs import redact

    assert redact(f"could not connect to {PG_URL}: refused") == \
        "could not connect to postgresql+psycopg://cxrnode:***@db.example.org:5432/cxrnode: refused"
