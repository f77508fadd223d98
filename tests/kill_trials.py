"""Kill -9 at random moments of saves onto one checkpoint path, then check what is left.

Run as a script (``python kill_trials.py PATH TRIALS SEED MAX_DELAY``): it
prints a JSON summary on its last line. Each trial forks a child that first
loads the checkpoint at PATH (the check of the previous trial's kill), then
saves one of three versions of the adapters over and over until the parent
kills it with SIGKILL after a random delay. A last child loads the result
and makes one more save, after which no temporary directory may remain.

The parent process never touches orbax, so every child starts from a clean
state; children use host (numpy) arrays only.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import jadapters
from jadapters.checkpoint import CheckpointError

OK, MISSING, CORRUPTED = 0, 3, 4


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(16, name="fc")(x)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = Block(name=f"block_{i}")(x)
        return x


def setup():
    x = np.ones((1, 16), np.float32)
    base = Net().init(jax.random.key(0), x)
    model = jadapters.with_adapters(Net(), {"blocks": "block_*"}).add_adapter("a", jadapters.LinearAdapter(8))
    variables = jadapters.init_adapters(model, base, jax.random.key(1), x)
    adapters, rest = jadapters.split_adapters(variables)
    versions = []
    for v in range(3):
        values = jax.tree_util.tree_map(lambda a, v=v: np.full(a.shape, v + 1, np.float32), adapters)
        versions.append(jadapters.merge_trees(values, jax.tree_util.tree_map(np.asarray, rest)))
    return model, jax.tree_util.tree_map(np.asarray, base), versions


def check(path, base, versions) -> int:
    """OK if the checkpoint at ``path`` loads and holds exactly one of ``versions``."""
    try:
        _, loaded = jadapters.load_adapters(path, Net(), base)
    except CheckpointError as e:
        if "no checkpoint at" in str(e) or "holds no committed" in str(e):
            return MISSING
        print(f"corrupted: {e}", file=sys.stderr)
        return CORRUPTED
    got = [np.asarray(a) for a in jax.tree_util.tree_leaves(jadapters.split_adapters(loaded)[0])]
    for version in versions:
        want = jax.tree_util.tree_leaves(jadapters.split_adapters(version)[0])
        if all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)):
            return OK
    print("corrupted: the values match no saved version", file=sys.stderr)
    return CORRUPTED


def run(path: str, trials: int, seed: int, max_delay: float, env: dict) -> dict:
    """Runs the trials in a fresh interpreter and checks what they found: no corrupted checkpoint,
    kills that landed inside saves, and nothing left over once the next save is done."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, path, str(trials), str(seed), str(max_delay)],
                          env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["corrupted"] == 0, proc.stderr[-3000:]
    assert result["ok"] + result["missing"] == trials and result["lost_after_commit"] == 0, result
    assert result["ok"] >= trials // 2, result  # most trials found a committed checkpoint to check
    assert result["killed_mid_save"] >= 5, result  # the kills did land inside saves
    assert result["leftovers_after_next_save"] == [] and result["entries_after_next_save"] == 1, result
    return result


def leftovers(path) -> list[str]:
    """What killed saves left at ``path``: entries that are not committed steps."""
    root = epath.Path(path)
    if not root.exists():
        return []
    committed = {m.path.name for m in ocp.step.standard_name_format().find_all(root)}
    return sorted(p.name for p in root.iterdir() if p.name not in committed)


def report(fd: int, **fields) -> None:
    os.write(fd, (json.dumps(fields) + "\n").encode())


def main(path: str, trials: int, seed: int, max_delay: float) -> None:
    if path.startswith("gs://"):
        importlib.import_module("gcsfs")  # imported once here rather than in every child
    model, base, versions = setup()
    rng = random.Random(seed)
    results = []
    killed_mid_save = 0
    for trial in range(trials):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: check the previous kill's result, then save until killed
            os.close(read_end)
            report(write_end, code=check(path, base, versions) if trial else OK, leftovers=len(leftovers(path)))
            i = 0
            while True:
                jadapters.save_adapters(path, model, versions[(trial + i) % 3])
                i += 1
        os.close(write_end)
        line = os.fdopen(read_end).readline()
        got = json.loads(line) if line else {"code": CORRUPTED, "leftovers": 0}
        if trial:
            results.append(got["code"])
            killed_mid_save += got["leftovers"] > 0
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the last check, then one save to completion
        os.close(read_end)
        before = leftovers(path)
        code = check(path, base, versions)
        jadapters.save_adapters(path, model, versions[0])
        report(write_end, code=code, before=before, after=leftovers(path), steps=len(list(epath.Path(path).iterdir())))
        os._exit(0)
    os.close(write_end)
    line = os.fdopen(read_end).readline()
    os.waitpid(pid, 0)
    final = json.loads(line) if line else {"code": CORRUPTED, "before": [], "after": ["?"], "steps": -1}
    results.append(final["code"])
    killed_mid_save += bool(final["before"])
    print(json.dumps({
        "trials": trials,
        "ok": results.count(OK),
        "missing": results.count(MISSING),
        # A checkpoint may be missing only until the first save completes; never once one existed.
        "lost_after_commit": sum(code == MISSING for code in results[results.index(OK):]) if OK in results else 0,
        "corrupted": len(results) - results.count(OK) - results.count(MISSING),
        "killed_mid_save": killed_mid_save,
        "leftovers_after_next_save": final["after"],
        "entries_after_next_save": final["steps"],
    }))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
