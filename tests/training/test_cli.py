"""The training command lines: `python -m training.code_adapter` and `python -m training.compressor`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training import code_adapter, compressor
from training.common import default_models_dir

ROOT = Path(__file__).resolve().parents[2]


def test_models_dir_defaults_to_kvrag_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KVRAG_HOME", str(tmp_path / "home"))
    assert default_models_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("KVRAG_HOME")
    assert default_models_dir() == Path("~/.local/share/kvrag/models").expanduser()


@pytest.mark.parametrize(
    "option",
    [
        ["--query-style", "web"],
        ["--query-writer", "bundled:smollm2-135m-instruct"],
        ["--keep-docstring"],
        ["--hard-negatives"],
        ["--batching", "source"],
    ],
)
def test_removed_code_adapter_options_are_refused(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        code_adapter.main(["--out", str(tmp_path / "a"), *option])
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_code_adapter_options_reach_the_trainer(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_train(cfg, *, models_dir, embedding_cache, show_progress, log):
        seen.update(cfg=cfg, models_dir=models_dir, embedding_cache=embedding_cache)
        return {"steps": 0}

    monkeypatch.setattr(code_adapter, "train_code_adapter", fake_train)
    monkeypatch.setenv("KVRAG_HOME", str(tmp_path / "home"))
    argv = [
        "--out",
        str(tmp_path / "a"),
        "--rank",
        "8",
        "--teacher",
        "T1",
        "--teacher",
        "T2",
        "--drop-docstring",
    ]
    assert code_adapter.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"steps": 0}
    cfg = seen["cfg"]
    assert cfg.rank == 8 and cfg.alpha == 16 and cfg.teachers == ("T1", "T2") and not cfg.docstring_rest
    assert cfg.extra["command"] == "python -m training.code_adapter " + " ".join([*argv, "--json"])
    assert seen["models_dir"] == tmp_path / "home" / "models"
    assert seen["embedding_cache"] == tmp_path / "home" / "cache" / "embeddings.sqlite"
    assert code_adapter.main([*argv, "--models-dir", str(tmp_path / "m"), "--json"]) == 0
    assert seen["models_dir"] == tmp_path / "m"


def test_fixable_errors_exit_2(tmp_path, capsys):
    out = str(tmp_path / "a")
    assert code_adapter.main(["--out", out, "--teacher", "x", "--distill-weight", "0", "--json"]) == 2
    assert "error: --distill-weight must be > 0" in capsys.readouterr().err
    assert compressor.main(["--out", out, "--data-dir", str(tmp_path / "no-data")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_compressor_options_reach_the_trainer(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_train(cfg, *, models_dir, show_progress, log):
        seen.update(cfg=cfg, models_dir=models_dir)
        return {"final_loss": 0.5}

    monkeypatch.setattr(compressor, "train_compressor", fake_train)
    argv = [
        "--out",
        str(tmp_path / "c"),
        "--data-dir",
        str(tmp_path),
        "--langs",
        "es, zh",
        "--models-dir",
        "m",
    ]
    assert compressor.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"final_loss": 0.5}
    assert seen["cfg"].langs == ("es", "zh") and seen["cfg"].data_dir == tmp_path
    assert seen["cfg"].extra["command"].startswith("python -m training.compressor --out ")
    assert seen["models_dir"] == Path("m")


@pytest.mark.parametrize("module", ["training.code_adapter", "training.compressor"])
def test_runs_as_a_module_from_the_checkout(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"usage: python -m {module}" in proc.stdout and "--models-dir" in proc.stdout
