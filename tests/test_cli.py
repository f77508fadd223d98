"""The ``jadapters`` command: demo (fast), inspect (table and JSON), and clean failures."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from jadapters import cli, inspect_checkpoint

DEMO_STEPS = 12

# One worker runs this file: the demo fixture then runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("cli")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One fast demo run, shared by the tests that look at what it wrote."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("demo") / "out"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["demo", "--out", str(out), "--steps", str(DEMO_STEPS), "--no-progress"])
    print(buffer.getvalue())
    return code, buffer.getvalue(), out


def test_demo_runs_and_writes_its_table_png_and_checkpoints(demo_run):
    code, output, out = demo_run
    assert code == 0
    for expected in (
        "normal digits", "rotated digits", "params trained", "base model", "LinearAdapter", "full fine-tuning",
        "checkpoint, adapters only", "checkpoint, full model", "predictions identical", "total wall time",
    ):
        assert expected in output, expected
    png = out / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert inspect_checkpoint(out / "adapters").kind == "adapters"
    assert inspect_checkpoint(out / "full_model").kind == "model"
    trained_share = [line for line in output.splitlines() if line.startswith("+ LinearAdapter")][0]
    assert float(trained_share.split("(")[-1].split("%")[0]) < 5.0  # share of params trained


def test_inspect_prints_a_table(demo_run, capsys):
    _, _, out = demo_run
    assert cli.main(["inspect", str(out / "adapters")]) == 0
    text = capsys.readouterr().out
    for expected in ("kind         adapters", "rotated", "LinearAdapter", "blocks+embed:block_*, embed", "yes",
                     "fingerprint"):
        assert expected in text, expected


def test_inspect_json(demo_run, capsys):
    _, _, out = demo_run
    assert cli.main(["inspect", "--json", str(out / "adapters")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapters"
    (adapter,) = info["adapters"]
    assert adapter["name"] == "rotated" and adapter["type"] == "LinearAdapter" and adapter["enabled"] is True
    assert sorted(adapter["locations"]) == ["block_0", "block_1", "block_2", "block_3", "embed"]
    assert adapter["params"] > 0 and adapter["bytes"] == 4 * adapter["params"]
    assert info["base_fingerprint"]["digest"] and "embed" in info["base_fingerprint"]["params"]
    assert cli.main(["inspect", "--json", str(out / "training_checkpoints")]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "training_state"


def test_bad_path_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jadapters: error: no checkpoint at") and "Traceback" not in err
    (tmp_path / "plain").mkdir()
    assert cli.main(["inspect", str(tmp_path / "plain")]) == 1
    assert "not a jadapters checkpoint" in capsys.readouterr().err


def test_bad_arguments_exit_with_usage(capsys):
    for argv in ([], ["nonsense"], ["inspect"], ["demo", "--steps", "0"], ["demo", "--steps", "many"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
        assert "usage: jadapters" in capsys.readouterr().err


def test_demo_without_its_extra_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert cli.main(["demo", "--out", str(tmp_path)]) == 1
    assert "pip install 'jadapters[demo]'" in capsys.readouterr().err


def test_the_console_script_fails_cleanly_on_a_bad_path(tmp_path):
    script = shutil.which("jadapters", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    command = [script] if script else [sys.executable, "-m", "jadapters.cli"]
    proc = subprocess.run(command + ["inspect", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "jadapters: error: no checkpoint at" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_names_a_missing_metadata_field_and_an_unknown_scheme(tmp_path, capsys):
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    import jadapters

    x = jnp.ones((1, 4))
    model = jadapters.with_adapters(nn.Dense(4), {"d": ""}).add_adapter("a", jadapters.LinearAdapter(2))
    variables = jadapters.init_adapters(model, nn.Dense(4).init(jax.random.key(0), x), jax.random.key(1), x)
    path = jadapters.save_adapters(tmp_path / "a", model, variables)
    (meta_file,) = [p for p in (tmp_path / "a").rglob("_CHECKPOINT_METADATA")]
    meta = json.loads(meta_file.read_text())
    del meta["custom_metadata"]["adapters"][0]["num_params"]
    meta_file.write_text(json.dumps(meta))
    assert cli.main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "malformed metadata: field 'adapters[0].num_params' is missing" in err and "Traceback" not in err
    assert cli.main(["inspect", "ftp://host/ckpt"]) == 1
    assert "the scheme 'ftp://' is not supported" in capsys.readouterr().err
