"""Roles and instances: ``cxrnode serve --role`` runs only the roles it names, and each process's
leases carry ``[node] instance_name``, so that start-up recovery takes back only this instance's
dead processes' jobs, even when several instances share one host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.errors import SettingsError
from node.housekeeping import recover
from node.http.server import role_listens, role_of
from node.queue import repository as repo
from node.queue.db import Database
from node.queue.states import JobStatus
from node.service import ROLES, Service, parse_roles
from node.settings import load_settings
from node.worker.runner import worker_name
from tests.servers import REPO


def test_roles_are_parsed_and_a_wrong_one_is_named() -> None:
    assert parse_roles("receiver") == {"receiver"}
    assert parse_roles(" Worker , sender,worker") == {"worker", "sender"}
    assert set(ROLES) == {"receiver", "worker", "sender"}
    for wrong in ("listener", "receiver,gpu", "", ","):
        with pytest.raises(SettingsError, match="--role: .* is not a role; give one or more of receiver, worker, sender"):
            parse_roles(wrong)


def test_the_cli_refuses_an_unknown_role_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
    done = subprocess.run([sys.executable, "-m", "node", "serve", "--role", "receiver,cache", "--config", str(config)],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "cxrnode: error: --role: cache is not a role; give one or more of receiver, worker, sender, separated by commas"]
    assert not (tmp_path / "var" / "queue.sqlite3").exists()  # refused before anything opened


@pytest.mark.parametrize(("listen", "work", "send", "role", "listens"), [
    (True, True, True, "serve", True),
    (True, False, False, "listener", True),
    (False, True, True, "worker", False),
    (True, False, True, "receiver+sender", True),
    (False, True, False, "inference", False),
    (False, False, True, "sender", False),
])
def test_each_combination_of_roles_has_a_name(listen: bool, work: bool, send: bool, role: str, listens: bool) -> None:
    assert role_of(listen=listen, work=work, send=send) == role
    assert role_listens(role) is listens


def test_a_sender_only_service_runs_the_sender_thread_and_nothing_else(tmp_path: Path) -> None:
    settings = load_settings(None, env={"CXRNODE_NODE_DATA_DIR": str(tmp_path / "var"),
                                        "CXRNODE_HTTP_ENABLED": "false"})
    service = Service(settings, listen=False, work=False, send=True)
    service.start()
    try:
        assert [t.name for t in service.threads] == ["sender"] and service.server is None
        assert all(t.is_alive() for t in service.threads)
    finally:
        service.shutdown(grace_s=5)
    assert not any(t.is_alive() for t in service.threads)


def test_instance_name_is_the_lease_identity_and_is_validated(tmp_path: Path) -> None:
    settings = load_settings(None, env={"CXRNODE_NODE_INSTANCE_NAME": "worker-2"})
    assert worker_name(settings, "infer").split(":")[0::2] == ["worker-2", "infer"]
    for wrong in ("has:colon", "white space", "-leading", "x" * 64):
        with pytest.raises(SettingsError, match="node.instance_name"):
            load_settings(None, env={"CXRNODE_NODE_INSTANCE_NAME": wrong})


def test_recovery_takes_back_only_this_instances_dead_leases(tmp_path: Path, queue_url: str) -> None:
    """Two instances on one host (the same pids are meaningful to both): recovering ``a`` returns
    ``a``'s job whose process is gone, leaves ``a``'s living one and every one of ``b``'s."""
    db = Database(tmp_path, queue_url)
    owners = {"a:999999:infer": None, "a:1:infer": None, "b:999999:infer": None}
    for n, owner in enumerate(owners, start=1):
        repo.enqueue(db, repo.ReceivedInstance(f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.3.9",
                                               "1.2.840.10008.1.2.1", f"received/1.2.3/1.2.3.{n}.dcm", 10, "SCU"))
        owners[owner] = repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, owner, 600)
    assert recover(db, "a") == [owners["a:999999:infer"]]  # pid 999999 is not alive; pid 1 is
    statuses = {owner: repo.get_job(db, job_id).status for owner, job_id in owners.items()}
    assert statuses == {"a:999999:infer": "queued", "a:1:infer": "processing", "b:999999:infer": "processing"}
    db.dispose()
