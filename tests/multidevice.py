"""Running a test script in a fresh interpreter that sees several CPU devices.

The device count is fixed when jax starts, so such checks run as scripts with
``--xla_force_host_platform_device_count`` set before jax is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_with_cpu_devices(script: str, num_devices: int, timeout: int = 300) -> dict:
    """Runs ``script`` with ``num_devices`` CPU devices; returns the JSON on its last stdout line."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={num_devices}".strip(),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
