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


def git(*args: str) -> str | None:
  """Output of `git <args>` in the repository, or None without git."""
  try:
    return subprocess.run(['git', '-C', REPO, *args], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def machine(**extra: Any) -> dict[str, Any]:
  """The machine, versions, command and load: recorded with every result."""
  import datetime  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  import shlex  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cpu = None
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f
                  if line.startswith('model name')), None)
  except OSError:
    pass
  return {**dict(
      cpu_model=cpu, nproc=os.cpu_count(),
      sched_cpus=len(os.sched_getaffinity(0)),
      platform=platform.platform(), python=platform.python_version(),
      jax=jax.__version__, jaxlib=jax.lib.__version__, flax=flax.__version__,
      backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      command=shlex.join([os.path.relpath(sys.executable, REPO)] + sys.argv),
      git_head=git('rev-parse', 'HEAD'),
      loadavg_start=list(os.getloadavg())), **extra}


def write_result(path: str, result: dict[str, Any], indent: int = 1) -> None:
  """Writes a benchmark's JSON (creating its folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=indent)
    f.write('\n')
  wall = result.get('wall_s')
  print(f'wrote {path}' + (f' ({wall:.0f} s)' if wall is not None else ''))
