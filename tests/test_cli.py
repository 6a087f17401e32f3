"""User errors end the entry points with one line ``error: <message>`` on stderr and exit status 1.

Subprocess tests run the real ``train.py`` / ``evaluate.py`` / ``mine.py`` on config composition errors,
which answer before torch loads (about a second each). Errors raised inside the task (a missing data
folder, a missing model) need the full stack, so those run ``evaluate.py`` as ``__main__`` in this process,
sharing its imports. The rest covers the message formatting and a small Hydra app whose task raises each
kind of error, with and without ``HYDRA_FULL_ERROR``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embedlab.cli import FULL_ERROR_ENV, error_message, hydra_main, one_line, user_error
from embedlab.errors import ConfigError
from tests.conftest import CONFIG_DIR, PROJECT_ROOT


def run_entry_point(script: str, overrides: list[str], run_dir: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FULL_ERROR_ENV}
    if full_error:
        env[FULL_ERROR_ENV] = "1"
    cmd = [sys.executable, script, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(code: int | None, stderr: str, message: str) -> None:
    """Exit status 1, no traceback (nor Hydra's hint about one), and ``error: <message>`` as the last line."""
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert FULL_ERROR_ENV not in stderr, stderr
    assert stderr.splitlines()[-1] == f"error: {message}", stderr


def model_options() -> str:
    return ", ".join(sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("evaluate.py", "foo=1", "Could not override 'foo'. To append to your config use +foo=1 (Key 'foo' is not in struct)"),
        ("train.py", "model=nope", f"In 'train': Could not find 'model/nope'. Available options in 'model': {model_options()}"),
        ("mine.py", "foo=1", "Could not override 'foo'. To append to your config use +foo=1 (Key 'foo' is not in struct)"),
    ],
)
def test_bad_override_is_one_line(script, override, message, tmp_path):
    proc = run_entry_point(script, [override], tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, message)


def test_unparsable_override_names_the_override(tmp_path):
    proc = run_entry_point("train.py", ["x=["], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: override 'x=[': no viable alternative at input '['"), proc.stderr


def test_full_error_env_shows_the_traceback(tmp_path):
    proc = run_entry_point("evaluate.py", ["foo=1"], tmp_path, full_error=True)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "hydra.errors.ConfigCompositionException: Could not override 'foo'." in proc.stderr
    assert "error: " not in proc.stderr


# ----------------------------------------------------------------------------------------- in process


def run_entry_point_in_process(script: str, overrides: list[str], run_dir: Path, capsys, monkeypatch) -> tuple[int | None, str]:
    """The real entry point run as ``__main__`` in this process (sharing its imports): (exit code, stderr)."""
    import runpy

    monkeypatch.delenv(FULL_ERROR_ENV, raising=False)
    logging_off = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null"]
    monkeypatch.setattr(sys, "argv", [script, f"hydra.run.dir={run_dir}", *logging_off, *overrides])
    capsys.readouterr()
    try:
        runpy.run_path(str(PROJECT_ROOT / script), run_name="__main__")
    except SystemExit as ex:
        return ex.code, capsys.readouterr().err
    return None, capsys.readouterr().err


def test_missing_data_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """A DataError raised by the task (BEIR folder not found under data.root)."""
    code, err = run_entry_point_in_process("evaluate.py", ["model=tiny", "logger=none", "data.root=/nonexistent"], tmp_path, capsys, monkeypatch)
    message = (
        "/nonexistent/scifact: BEIR dataset folder not found (a BEIR folder holds corpus.jsonl, queries.jsonl and "
        "qrels/<split>.tsv; embedlab.data.readers.beir_download(name, root) fetches one)"
    )
    assert_one_line_error(code, err, message)


def test_missing_model_is_one_line(tmp_path, tiny_data_root, capsys, monkeypatch):
    """A ModelLoadError raised inside hydra.utils.instantiate (wrapped in an InstantiationException)."""
    code, err = run_entry_point_in_process("evaluate.py", ["model.path=/nonexistent", "logger=none", f"data.root={tiny_data_root}"], tmp_path, capsys, monkeypatch)
    assert_one_line_error(code, err, "model path '/nonexistent' does not exist (expected a model folder, a .ckpt file or a Hub id)")


def raise_config_error(value: int) -> None:
    raise ConfigError(f"module.value must be >= 0, got {value}")


def raise_type_error(value: int) -> None:
    raise TypeError("a bug")


def test_user_error_is_found_through_instantiate():
    with pytest.raises(InstantiationException) as info:
        instantiate({"_target_": "tests.test_cli.raise_config_error", "value": -1})
    cause = user_error(info.value)
    assert isinstance(cause, ConfigError)
    assert error_message(cause) == "module.value must be >= 0, got -1"

    with pytest.raises(InstantiationException) as info:
        instantiate({"_target_": "tests.test_cli.raise_type_error", "value": -1})
    assert user_error(info.value) is None  # a bug inside a constructor keeps its traceback
    assert user_error(RuntimeError("a bug")) is None


def test_omegaconf_messages_keep_the_key():
    cfg = OmegaConf.create({"data": {"name": "???", "root": "${paths.nope}"}, "paths": {}})
    OmegaConf.set_struct(cfg, True)
    expected = {
        "name": "Missing mandatory value: data.name",
        "foo": "Key 'foo' is not in struct (full_key: data.foo)",
        "root": "Interpolation key 'paths.nope' not found (full_key: data.root)",
    }
    for key, message in expected.items():
        with pytest.raises(Exception) as info:
            getattr(cfg.data, key)
        assert user_error(info.value) is info.value
        assert error_message(info.value) == message


def test_one_line():
    assert one_line("plain message") == "plain message"
    text = "In 'train': Could not find 'model/nope'\n\nAvailable options in 'model':\n\thf\n\ttiny\nConfig search path:\n\tprovider=main"
    assert one_line(text) == "In 'train': Could not find 'model/nope'. Available options in 'model': hf, tiny"
    assert one_line("Could not override 'foo'.\nTo append to your config use +foo=1") == "Could not override 'foo'. To append to your config use +foo=1"


@pytest.fixture
def tiny_app(tmp_path, monkeypatch):
    """A ``@hydra_main`` app run in this process: ``run(*overrides)`` -> (exit code or None, stderr lines).

    Its task records whether it saw ``HYDRA_FULL_ERROR`` (processes it starts would inherit it), then
    fails as ``mode`` says."""
    (tmp_path / "app.yaml").write_text(
        "defaults:\n  - override hydra/job_logging: none\n  - override hydra/hydra_logging: none\n  - _self_\n"
        f"mode: ok\nvalue: ???\nhydra:\n  run:\n    dir: {tmp_path / 'run'}\n  output_subdir: null\n"
    )
    seen_env = []

    def task(cfg):
        seen_env.append(os.environ.get(FULL_ERROR_ENV))
        if cfg.mode == "missing":
            return cfg.value
        if cfg.mode == "config":
            instantiate({"_target_": "tests.test_cli.raise_config_error", "value": -2})
        if cfg.mode == "bug":
            raise RuntimeError("a bug")
        return None

    main = hydra_main(config_name="app", config_path=str(tmp_path))(task)

    def run(capsys, *overrides):
        monkeypatch.setattr(sys, "argv", ["app.py", *overrides])
        capsys.readouterr()
        code = None
        try:
            main()
        except SystemExit as ex:
            code = ex.code
        return code, capsys.readouterr().err.splitlines(), seen_env

    return run


def test_task_user_errors_in_process(tiny_app, capsys, monkeypatch):
    monkeypatch.delenv(FULL_ERROR_ENV, raising=False)
    assert tiny_app(capsys, "mode=missing") == (1, ["error: Missing mandatory value: value"], [None])
    assert tiny_app(capsys, "mode=config")[:2] == (1, ["error: module.value must be >= 0, got -2"])
    assert tiny_app(capsys, "mode=ok")[0] is None
    assert FULL_ERROR_ENV not in os.environ  # set only around Hydra's composition, removed again
    code, err, seen_env = tiny_app(capsys, "mode=bug")
    assert code == 1 and "Traceback (most recent call last):" in err and err[-3] == "RuntimeError: a bug"  # Hydra's report
    assert seen_env == [None] * 4  # the task (and what it launches) never sees the setting


def test_task_errors_raise_with_full_error(tiny_app, capsys, monkeypatch):
    from omegaconf.errors import MissingMandatoryValue

    monkeypatch.setenv(FULL_ERROR_ENV, "1")
    with pytest.raises(MissingMandatoryValue):
        tiny_app(capsys, "mode=missing")
    assert os.environ[FULL_ERROR_ENV] == "1"
