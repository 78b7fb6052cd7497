"""Launching a two-process jax.distributed run on 127.0.0.1 for the multi-host tests.

Each worker script takes `PROCESS_ID NUM_PROCESSES PORT ARGS...`, makes 4 CPU devices itself
and writes its result to a file that the test reads after `workers` returns.
"""

import contextlib
import os
import socket
import subprocess
import sys

NUM_PROCESSES = 2


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def workers(script: str, *args: str, timeout: float = 600):
  """Starts NUM_PROCESSES copies of `script`; the `with` body runs meanwhile (the test's
  single-process reference). On leaving, waits for them and fails with the log tail of any
  worker that did not exit 0; a worker still running on an error is killed."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",  # the workers make 4 devices each
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                         os.environ.get("PYTHONPATH", "")]))
  port = str(free_port())
  procs = [subprocess.Popen([sys.executable, script, str(i), str(NUM_PROCESSES), port, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(NUM_PROCESSES)]
  try:
    yield
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-4000:]}"
