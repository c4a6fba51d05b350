"""The archive's one interface, on both backends: a folder and a real S3-compatible object store
(SeaweedFS on loopback). The same contract, the same tests; and what only one backend has (a
folder's permissions and crash leftovers, an object store that cannot be reached)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from node.archive import (
    Archive,
    ArchiveError,
    UnsafeKey,
    UnsafeUID,
    key_name,
    open_archive,
)
from node.archive.folder import FolderArchive
from node.archive.s3 import S3Archive
from node.errors import SettingsError
from node.settings import Settings, load_settings
from tests.servers import SeaweedFS, free_port

STUDY, SOP = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1"


def settings_for(tmp_path: Path, archive_config: str) -> Settings:
    config = tmp_path / "cxrnode.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n' + archive_config)
    return load_settings(config, env={})


@pytest.fixture
def archive(tmp_path: Path, archive_config: str) -> Archive:
    return open_archive(settings_for(tmp_path, archive_config))


def test_objects_are_stored_read_listed_and_deleted_by_key(archive: Archive) -> None:
    key = archive.received_key(STUDY, SOP)
    assert key == f"received/{STUDY}/{SOP}.dcm"
    assert archive.size(key) is None and not archive.exists(key)
    assert archive.put(key, b"DICM bytes") == 10
    assert archive.read(key) == b"DICM bytes" and archive.size(key) == 10 and archive.exists(key)
    seg, sr = archive.result_key(7, "seg"), archive.result_key(7, "sr")
    archive.put(seg, b"s" * 300)
    archive.put(sr, memoryview(b"r" * 200))
    archive.put(archive.result_key(70, "seg"), b"another job")
    assert [(i.key, i.size) for i in archive.list(archive.results_prefix(7))] == [(seg, 300), (sr, 200)]
    assert [i.key for i in archive.list("received/")] == [key]
    assert archive.total_bytes() == 10 + 300 + 200 + 11
    archive.put(key, b"replaced")  # a put replaces whole
    assert archive.read(key) == b"replaced"
    archive.delete(seg)
    archive.delete(seg)  # deleting what is gone is nothing
    assert archive.list(archive.results_prefix(7)) == [archive.list(archive.results_prefix(7))[0]]
    assert archive.size(seg) is None
    with pytest.raises(FileNotFoundError):
        archive.read(seg)


@pytest.mark.parametrize("key", ["/etc/passwd", "../received/x.dcm", "received/../../x", "received//x.dcm",
                                 "models/x.dcm", "received", "received/.hidden", ""])
def test_only_archive_keys_are_accepted(archive: Archive, key: str) -> None:
    for use in (lambda: archive.put(key, b"x"), lambda: archive.read(key), lambda: archive.size(key),
                lambda: archive.delete(key)):
        with pytest.raises(UnsafeKey):
            use()


def test_uids_that_cannot_name_an_object_are_refused(archive: Archive) -> None:
    with pytest.raises(UnsafeUID):
        archive.received_key("1.2.3", "../../1.2")


def test_a_different_copy_is_kept_as_the_next_version_and_an_identical_one_is_not(archive: Archive) -> None:
    first = archive.received_key(STUDY, SOP)
    archive.put(first, b"first bytes")
    assert archive.keep_version(first, b"first bytes") is None
    assert archive.keep_version(first, b"first bytes", first_size=11) is None
    v2 = archive.keep_version(first, b"other bytes")
    assert v2 == f"received/{STUDY}/{SOP}.v2.dcm" and archive.read(v2) == b"other bytes"
    assert archive.keep_version(first, b"other bytes") == v2  # the same difference again: the same version
    v3 = archive.keep_version(first, b"third")
    assert key_name(v3) == f"{SOP}.v3.dcm"
    # first_size differing from the data's spares hashing the first: still a version, never a loss
    assert archive.keep_version(first, b"first bytes!", first_size=11) == f"received/{STUDY}/{SOP}.v4.dcm"
    assert [v.name for v in archive.versions(first)] == [f"{SOP}.v2.dcm", f"{SOP}.v3.dcm", f"{SOP}.v4.dcm"]


def test_a_missing_first_copy_counts_as_different(archive: Archive) -> None:
    first = archive.received_key(STUDY, SOP)
    assert archive.keep_version(first, b"bytes") == f"received/{STUDY}/{SOP}.v2.dcm"


def test_local_file_holds_the_object_while_it_is_used(archive: Archive) -> None:
    key = archive.result_key(3, "sr")
    archive.put(key, b"report bytes")
    with archive.local_files([key, key]) as (one, two):
        assert one.read_bytes() == two.read_bytes() == b"report bytes"
    if isinstance(archive, S3Archive):  # a private copy, gone afterwards
        assert not one.exists() and stat.S_IMODE(archive.scratch.stat().st_mode) == 0o700
    else:
        assert one == archive.path(key) and one.exists()
    with pytest.raises(FileNotFoundError), archive.local_file(archive.result_key(4, "sr")):
        pass


def test_the_readiness_probe_writes_and_leaves_nothing(archive: Archive) -> None:
    assert archive.probe().startswith("writable")
    assert archive.list("") == [] or all(not i.key.startswith("tmp/") for i in archive.list(""))
    assert "secret" not in archive.describe().lower()


# ----- the folder -----

def test_a_folder_archive_is_private_and_durable_by_rename(tmp_path: Path) -> None:
    archive = open_archive(settings_for(tmp_path, ""))
    assert isinstance(archive, FolderArchive) and archive.root == tmp_path / "var" / "archive"
    key = archive.received_key(STUDY, SOP)
    archive.put(key, b"x")
    path = archive.path(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert list(archive.tmp.iterdir()) == []
    archive.delete(key)
    assert not path.parent.exists()  # the emptied study folder goes too
    assert (archive.root / "received").is_dir()


def test_a_shared_folder_can_be_named_by_path_or_file_url(tmp_path: Path) -> None:
    shared = tmp_path / "nfs" / "cxrnode"
    for url in (str(shared), f"file://{shared}"):
        archive = open_archive(settings_for(tmp_path, f'[archive]\nurl = "{url}"\n'))
        assert isinstance(archive, FolderArchive) and archive.root == shared
    with pytest.raises(SettingsError, match="archive.url: 'relative/dir' is not an absolute folder path"):
        settings_for(tmp_path, '[archive]\nurl = "relative/dir"\n')
    with pytest.raises(SettingsError, match="archive.url: scheme 'ftp' is not supported"):
        settings_for(tmp_path, '[archive]\nurl = "ftp://host/x"\n')
    with pytest.raises(SettingsError, match="not an S3 bucket name"):
        settings_for(tmp_path, '[archive]\nurl = "s3://Bad_Bucket/x"\n')


# ----- the object store -----

def test_the_s3_secret_is_never_shown(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    from node.settings import describe

    settings = settings_for(tmp_path, seaweedfs.archive_config("some-prefix"))
    assert seaweedfs.secret_key not in repr(settings) and seaweedfs.secret_key not in str(describe(settings))
    assert describe(settings)["archive"]["s3_secret_access_key"] == "(set, not shown)"
    assert seaweedfs.secret_key not in open_archive(settings).describe()


def test_objects_live_under_the_prefix_in_the_bucket(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    site_a, site_b = seaweedfs.prefix(), seaweedfs.prefix()
    archive = open_archive(settings_for(tmp_path, seaweedfs.archive_config(site_a + "/")))
    key = archive.received_key(STUDY, SOP)
    archive.put(key, b"bytes")
    listed = seaweedfs.client().list_objects_v2(Bucket=seaweedfs.BUCKET, Prefix=site_a)["Contents"]
    assert [o["Key"] for o in listed] == [f"{site_a}/{key}"]
    other = open_archive(settings_for(tmp_path, seaweedfs.archive_config(site_b)))
    assert other.list("") == [] and not other.exists(key)  # another prefix is another archive


def test_an_object_store_that_cannot_be_reached_is_an_archive_error(tmp_path: Path) -> None:
    config = (f'[archive]\nurl = "s3://cxrnode/x"\ns3_endpoint_url = "http://127.0.0.1:{free_port()}"\n'
              's3_access_key_id = "k"\ns3_secret_access_key = "s"\ns3_timeout_s = 1.0\n')
    archive = open_archive(settings_for(tmp_path, config))
    key = archive.received_key(STUDY, SOP)
    for use in (lambda: archive.put(key, b"x"), lambda: archive.read(key), lambda: archive.size(key),
                lambda: archive.list(""), archive.probe):
        with pytest.raises(ArchiveError, match=r"object store s3://cxrnode/x at http://127\.0\.0\.1") as caught:
            use()
        assert isinstance(caught.value, OSError)  # the listener answers 0xA700, the worker retries


def test_a_refused_login_is_an_archive_error_naming_the_code(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    config = seaweedfs.archive_config(seaweedfs.prefix()).replace(seaweedfs.secret_key, "wrong-secret")
    archive = open_archive(settings_for(tmp_path, config))
    with pytest.raises(ArchiveError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        archive.put(archive.received_key(STUDY, SOP), b"x")
