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
