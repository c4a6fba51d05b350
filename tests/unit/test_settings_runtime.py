"""``[worker] runtime``: torch (default) or onnx, from the file or CXRNODE_WORKER_RUNTIME; onnx is CPU only."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.errors import SettingsError
from node.settings import WorkerSettings, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_the_default_runtime_is_torch() -> None:
    assert WorkerSettings().runtime == "torch"
    assert load_settings(None, env={}).worker.runtime == "torch"


def test_runtime_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[worker]\nruntime = "onnx"\ndevice = "cpu"\n')
    assert load_settings(path, env={}).worker.runtime == "onnx"
    assert load_settings(path, env={"CXRNODE_WORKER_RUNTIME": "torch"}).worker.runtime == "torch"
    assert load_settings(None, env={"CXRNODE_WORKER_RUNTIME": "onnx"}).worker.runtime == "onnx"


@pytest.mark.parametrize("value", ["tensorrt", "ONNX", "", "onnxruntime"])
def test_an_unknown_runtime_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(SettingsError, match=rf"^worker\.runtime: {value!r} is not torch or onnx$"):
        load_settings(write(tmp_path, f'[worker]\nruntime = "{value}"\n'), env={})
    with pytest.raises(SettingsError, match=r"worker\.runtime"):
        load_settings(None, env={"CXRNODE_WORKER_RUNTIME": value})


def test_a_runtime_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"worker\.runtime: expected a string"):
        load_settings(write(tmp_path, "[worker]\nruntime = 1\n"), env={})


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_onnx_on_a_named_gpu_is_refused_with_what_to_do(device: str) -> None:
    with pytest.raises(SettingsError, match=r'worker\.runtime: "onnx" runs on the CPU') as err:
        load_settings(None, env={"CXRNODE_WORKER_RUNTIME": "onnx", "CXRNODE_WORKER_DEVICE": device})
    assert f"worker.device is {device!r}" in str(err.value) and 'runtime "torch" for the GPU' in str(err.value)
    assert load_settings(None, env={"CXRNODE_WORKER_DEVICE": device}).worker.runtime == "torch"  # torch may


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_onnx_with_auto_or_cpu_is_accepted(device: str) -> None:
    worker = WorkerSettings(runtime="onnx", device=device)
    assert (worker.runtime, worker.device) == ("onnx", device)


def test_the_onnx_cache_is_in_the_data_folder(tmp_path: Path) -> None:
    settings = load_settings(None, env={"CXRNODE_NODE_DATA_DIR": str(tmp_path / "var")})
    assert settings.onnx_cache_path == tmp_path / "var" / "cache" / "onnx"
