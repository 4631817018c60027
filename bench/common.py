"""What the benchmark scripts share: running themselves on 2 fake devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(script: str) -> dict[str, Any]:
  """Runs `script` with 2 host CPU devices and `--child_out`; returns its JSON.

  The child gets this process's flags, less `--out`.
  """
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=2').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO] + [p for p in [env.get('PYTHONPATH')] if p])
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'child.json')
    argv = [sys.executable, os.path.abspath(script), f'--child_out={out}']
    argv += [a for a in sys.argv[1:] if not a.startswith('--out')]
    subprocess.run(argv, env=env, check=True)
    with open(out) as f:
      return json.load(f)
