"""crossent.jax's vocabulary-parallel losses under shard_map on 4 host devices (jax_parallel_check.py, run
in its own process so that the device count does not leak into the rest of the suite)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")


@pytest.mark.slow
def test_vocab_parallel_over_four_host_devices_equals_one_device():
    here = os.path.dirname(__file__)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    src = os.path.join(os.path.dirname(here), "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, os.path.join(here, "jax_parallel_check.py")], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")
