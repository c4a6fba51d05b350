"""The log set-up: library messages that quote header values are redacted; files are private."""

from __future__ import annotations

import logging
import stat
import warnings
from pathlib import Path

import pytest
from pydicom.valuerep import DA

from node import logs


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_redact_library_messages_that_quote_values() -> None:
    with pytest.raises(ValueError) as raised:
        DA("12/04/1936")
    assert "12/04/1936" in str(raised.value)
    assert "12/04/1936" not in logs.redact(str(raised.value))
    assert logs.redact("Invalid value for VR DA: '1936-12-04'. Please see <url>") == \
        f"Invalid value for VR DA: {logs.REDACTED}. Please see <url>"
    assert "Zyx" not in logs.redact('The string "Zyx" is unlikely to represent the intended')
    plain = "C-STORE 1.2.3 from GOODSCU: archived, job 4 queued"
    assert logs.redact(plain) == plain


def test_tracebacks_and_warnings_are_redacted_in_the_log_file(tmp_path: Path,
                                                              restore_logging) -> None:
    logs.configure("INFO", tmp_path / "var")
    birth_date = "".join(["31.12.", "1936"])  # not in this file's source (tracebacks quote it)
    try:
        DA(birth_date)
    except ValueError:
        logging.getLogger("node.test").exception("job 1: inference failed")
    name = "Doe^Jane" + "-Quux"
    warnings.warn(f"Invalid value for VR PN: {name!r}.", UserWarning, stacklevel=1)
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = (tmp_path / "var" / "logs" / "cxrnode.log").read_text()
    assert "job 1: inference failed" in text and "Traceback" in text
    assert logs.REDACTED in text and "Invalid value for VR PN" in text
    assert "31.12.1936" not in text and "Jane-Quux" not in text


def test_log_folder_and_every_log_file_are_private(tmp_path: Path, restore_logging) -> None:
    data_dir = tmp_path / "new" / "var"
    logs.configure("INFO", data_dir)
    (handler,) = [h for h in logging.getLogger().handlers
                  if isinstance(h, logs.PrivateRotatingFileHandler)]
    handler.maxBytes = 200
    for i in range(20):
        logging.getLogger("node.test").info("line %d of some length to force a rollover", i)
    files = sorted((data_dir / "logs").iterdir())
    assert len(files) > 1  # rotated
    assert {stat.filemode(p.stat().st_mode) for p in files} == {"-rw-------"}
    for folder in (tmp_path / "new", data_dir, data_dir / "logs"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
