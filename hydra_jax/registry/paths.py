"""Where the package's files and its cache are: one answer for every module that asks.

The cache (prepared models, generated training data, built test models) is `$HYDRA_CACHE`,
else `${XDG_CACHE_HOME:-~/.cache}/hydra_jax`: point HYDRA_CACHE at an empty folder and nothing
of an earlier run is seen.
"""

from __future__ import annotations

import os

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../hydra_jax
REPO_ROOT = os.path.dirname(PACKAGE_DIR)  # a clone's root (data/, configs/): not in a wheel
ASSETS_DIR = os.path.join(PACKAGE_DIR, "assets")  # shipped models and heads

# Draft-head kinds in benchmark / table order; also the directory names of shipped heads
# (hydra_pp: "+" is awkward in paths and shells).
HEAD_KINDS = ("medusa", "hydra", "hydra_pp")
HEAD_LABELS = {"medusa": "Medusa", "hydra": "Hydra", "hydra_pp": "Hydra++"}


def cache_root() -> str:
  if os.environ.get("HYDRA_CACHE"):
    return os.path.expanduser(os.environ["HYDRA_CACHE"])
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(xdg, "hydra_jax")
