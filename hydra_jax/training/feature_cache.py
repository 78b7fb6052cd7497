r"""Cached base features: the frozen base runs once per training row, not once per step.

Why: the base is frozen, so every epoch and every head kind (Medusa, Hydra, Hydra++) would
recompute the same base forward, which costs far more than the heads (SmolLM2: a 135M base
against ~14M of heads). This module runs the base once over the training rows the data
pipeline (data.py) produces and stores, per row, what the heads read: the base's last hidden
state, exactly as `step.base_hidden` computes it in the step, plus the row's tokens,
positions and loss mask. Nothing the step recomputes cheaply is stored: the token
embeddings are a table lookup and the Hydra++ teacher is the base's LM head over the hidden
state (over the draft vocabulary where the heads use one), so both stay in the step.

    python -m hydra_jax.training.feature_cache --config configs/smollm2_hydra_pp.py \
        --out ~/.cache/hydra_jax/features/smollm2_magpie [--config.FIELD=V ...] \
        [--dtype bfloat16|float32] [--shard_rows N]
    python train.py --config configs/smollm2_hydra_pp.py --workdir W \
        --config.data.feature_cache=~/.cache/hydra_jax/features/smollm2_magpie

The cache depends on the base (weights and train.base_dtype), the tokenizer, the data
section, seq_len and seed (the held-out split): every head kind trained with those shares
one cache. global_batch_size and mesh_shape only set how the build batches the forward.
Evaluation never reads the cache: the held-out rows run the base online, as before.

DIR holds manifest.json and, per shard s of R rows (in the train split's order):
  shard_{s:05d}.hidden.npy     [R, T, D] uint16, the bits of bfloat16 (np.load reads it without
                               pickle; a .npy of ml_dtypes.bfloat16 would come back as void), or
                               float32 with --dtype float32 (exact: for tests and comparisons)
  shard_{s:05d}.tokens.npy     [R, T] int32
  shard_{s:05d}.positions.npy  [R, T] int32
  shard_{s:05d}.loss_mask.npy  [R, T] uint8
  shard_{s:05d}.row_ids.npy    [R] int64, the data pipeline's example id of each row
manifest.json records what the features are for (the base's config fingerprint, a sampled
sha256 of its weights and its dtype; the tokenizer's class, size and sha256; seq_len, D,
dtype; the train rows' fingerprint and the data config they came from), the row and token
counts and each shard file's sha256. The trainer refuses a cache whose manifest disagrees
with the run, an unfinished one, and a shard whose bytes do not match their sha256.

Building is resumable shard by shard: the manifest is rewritten (atomically) after every
shard, and a rerun keeps the recorded shards whose sha256 still matches, then continues.
On a mesh, every build batch is split over the data axes like a training batch; with
several processes each one computes its rows, the hidden states are gathered and process 0
alone writes (so DIR must be on storage every process reads: at training time each process
reads rows of every shard, as the epochs' shuffles put any row in any process's slice).

Shapes: R rows per shard, B rows per batch, T seq_len, D the base's hidden size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from hydra_jax.checkpoint.heads_io import file_sha256
from hydra_jax.checkpoint.hf import CheckpointError, HFModel
from hydra_jax.model.llama import LlamaModel
from hydra_jax.parallel.sharding import (LOGICAL_RULES, base_param_shardings, batch_sharding,
                                         make_global_batch, shard_base_params)
from hydra_jax.training import step
from hydra_jax.training.data import BatchIterator, build_datasets
from hydra_jax.training.errors import ConfigError, TrainingError
from hydra_jax.training.host_loop import to_host
from hydra_jax.training.run_setup import (check_config, load_base, make_run_mesh,
                                          maybe_initialize_distributed)

log = logging.getLogger("hydra_jax.training.feature_cache")  # also when run as __main__

FORMAT = "hydra_jax.feature_cache/1"
MANIFEST = "manifest.json"
DTYPES = ("bfloat16", "float32")
ARRAYS = ("hidden", "tokens", "positions", "loss_mask", "row_ids")
_FILE_DTYPES = {"bfloat16": np.uint16, "float32": np.float32}
_SHARD_BYTES = 64 << 20  # default shard size: ~64 MiB of hidden states
_DIGEST_SAMPLES = 1 << 16  # elements read per base param leaf for the weights digest
# Checked at read time (and before a build continues a partial cache); the rest is a record.
_IDENTITY = ("format", "base", "tokenizer", "seq_len", "hidden_size", "rows", "train_fingerprint")


# --- what a cache is for ----------------------------------------------------------------------


def base_digest(base_params) -> str:
  """sha256 over every param leaf's path, shape, dtype and an evenly strided sample of its
  elements (up to 65,536 per leaf). Any other weights (another seed, a fine-tune, another
  dtype) change it; reading samples keeps it cheap for any model size. Host params."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(base_params)
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    flat = leaf.reshape(-1)
    stride = max(1, -(-flat.size // _DIGEST_SAMPLES))
    sample = np.asarray(jax.device_get(flat[::stride]))
    h.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{leaf.dtype}|".encode())
    h.update(sample.tobytes())
  return h.hexdigest()


def tokenizer_identity(tokenizer) -> Dict[str, Any]:
  """Class, size and a sha256 of the tokenizer's full definition (its JSON when it has one)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    blob = backend.to_str()
  else:
    blob = json.dumps(sorted(tokenizer.get_vocab().items()))
  return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
          "sha256": hashlib.sha256(blob.encode()).hexdigest()}


def cache_identity(config, base: HFModel, train_it: BatchIterator) -> Dict[str, Any]:
  """The manifest fields a cache must share with a run to be read by it (see _IDENTITY)."""
  data = {k: v for k, v in config.data.to_dict().items() if k != "feature_cache"}
  return {
      "format": FORMAT,
      "base": {"config_fingerprint": base.config.fingerprint(),
               "weights_sha256_sampled": base_digest(base.params),
               "dtype": str(config.train.base_dtype)},
      "tokenizer": tokenizer_identity(base.tokenizer),
      "seq_len": int(train_it.seq_len),
      "hidden_size": int(base.config.hidden_size),
      "rows": int(train_it.num_examples),
      # data.py's crc of the split's example ids and of the tokenized rows: the same data
      # file(s), template, split and seed give the same rows.
      "train_fingerprint": train_it.fingerprint,
      "data": dict(data, seed=int(config.seed)),
      "model_path": os.path.abspath(os.path.expanduser(str(config.model_path))),
  }


def build_hint(path: str) -> str:
  return (f"python -m hydra_jax.training.feature_cache --config CONFIG --out {path} (the "
          f"config and --config.* overrides of this run)")


def _differences(recorded: Dict[str, Any], current: Dict[str, Any], keys) -> List[str]:
  out = []
  for key in keys:
    a, b = recorded.get(key), current.get(key)
    if a == b:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f"{key}.{k}: {a.get(k)!r} in the cache vs {b.get(k)!r} here"
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    else:
      out.append(f"{key}: {a!r} in the cache vs {b!r} here")
  return out


# --- files ------------------------------------------------------------------------------------


def _replace_atomically(path: str, write) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_manifest(path: str) -> Optional[Dict[str, Any]]:
  """DIR/manifest.json, or None when there is none."""
  fname = os.path.join(path, MANIFEST)
  if not os.path.isfile(fname):
    return None
  try:
    with open(fname) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{fname} is unreadable ({e}); delete {path} and rebuild it with "
                      f"{build_hint(path)}") from e


def _write_manifest(path: str, manifest: Dict[str, Any]) -> None:
  text = json.dumps(manifest, indent=1, sort_keys=True).encode()
  _replace_atomically(os.path.join(path, MANIFEST), lambda f: f.write(text))


def _write_shard(path: str, index: int, arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
  """Writes one shard's files (each atomically); -> its manifest entry with their sha256."""
  files = {}
  for name in ARRAYS:
    fname = f"shard_{index:05d}.{name}.npy"
    _replace_atomically(os.path.join(path, fname),
                        lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
    files[name] = {"file": fname, "sha256": file_sha256(os.path.join(path, fname))}
  return {"index": index, "rows": int(len(arrays["row_ids"])),
          "targets": int(arrays["loss_mask"].sum(dtype=np.int64)), "files": files}


def _bad_file(path: str, entry: Dict[str, Any]) -> Optional[str]:
  """The first file of a shard that is missing or does not match its sha256, else None."""
  for rec in entry["files"].values():
    fname = os.path.join(path, rec["file"])
    if not os.path.isfile(fname) or file_sha256(fname) != rec["sha256"]:
      return fname
  return None


# --- building ---------------------------------------------------------------------------------


def load_training_inputs(config):
  """(base HFModel, mesh, train BatchIterator) of a training config, checked as train.py checks
  them: what a cache is built from (and what the feature-cache benchmark trains on)."""
  base = load_base(config)
  check_config(config, base.config)
  mesh = make_run_mesh(config)
  train_it, _, _ = build_datasets(config.data, base.tokenizer, int(config.seq_len),
                                  int(config.global_batch_size), int(config.seed),
                                  max_len=base.config.max_position_embeddings)
  return base, mesh, train_it


def build_feature_cache(config, out_dir: str, *, dtype: str = "bfloat16",
                        shard_rows: int = 0) -> Dict[str, Any]:
  """Loads the config's base and training rows, then `write_features`; -> the manifest."""
  maybe_initialize_distributed(config.distributed)
  base, mesh, train_it = load_training_inputs(config)
  return write_features(base, train_it, mesh, out_dir, cache_identity(config, base, train_it),
                        dtype=dtype, shard_rows=shard_rows)


def _resume_point(out_dir: str, header: Dict[str, Any]) -> List[Dict[str, Any]]:
  """The recorded shards of a partial (or complete) cache in out_dir that are still intact."""
  old = read_manifest(out_dir)
  if old is None:
    return []
  diffs = _differences(old, header, _IDENTITY + ("dtype", "shard_rows"))
  if diffs:
    raise ConfigError(f"{out_dir} holds a feature cache of something else ({'; '.join(diffs)}); "
                      f"pass another --out or delete that directory")
  kept = []
  for entry in old["shards"]:
    bad = _bad_file(out_dir, entry)
    if bad is not None:
      log.warning("feature cache: %s is missing or fails its sha256: rebuilding from shard %d",
                  bad, entry["index"])
      break
    kept.append(entry)
  return kept


def write_features(base: HFModel, train_it: BatchIterator, mesh, out_dir: str,
                   header: Dict[str, Any], *, dtype: str = "bfloat16",
                   shard_rows: int = 0) -> Dict[str, Any]:
  """Runs the base over every row of `train_it`'s split, in order, into shards in out_dir.

  Resumes a partial cache of the same header. Every process must call it (the forward is
  sharded over the mesh); process 0 writes. Returns the final manifest.
  """
  if dtype not in DTYPES:
    raise ConfigError(f"feature cache dtype {dtype!r}; use one of {', '.join(DTYPES)}")
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  g, t, d = train_it.global_batch_size, train_it.seq_len, base.config.hidden_size
  if shard_rows <= 0:
    shard_rows = max(1, _SHARD_BYTES // (t * d * np.dtype(_FILE_DTYPES[dtype]).itemsize))
  shard_rows = -(-int(shard_rows) // g) * g  # whole build batches per shard
  header = dict(header, dtype=dtype, shard_rows=shard_rows)
  ids = train_it.indices
  num_shards = -(-len(ids) // shard_rows)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(out_dir, exist_ok=True)
  shards = _resume_point(out_dir, header) if is_main else []
  if jax.process_count() > 1:  # every process starts at process 0's resume point
    start = int(multihost_utils.broadcast_one_to_all(np.int32(len(shards))))
  else:
    start = len(shards)

  base_model = LlamaModel(base.config, dtype=step.parse_dtype(header["base"]["dtype"]))
  store = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  rows_sh = batch_sharding(mesh)
  features = jax.jit(
      lambda params, tokens, positions: step.base_hidden(base_model, params, tokens,
                                                         positions).astype(store),
      in_shardings=(base_param_shardings(base.config, mesh, LOGICAL_RULES), rows_sh, rows_sh),
      out_shardings=rows_sh)
  base_params = shard_base_params(base.params, mesh, LOGICAL_RULES, model_cfg=base.config)

  t0, kept_rows, done_rows = time.perf_counter(), 0, 0
  if start:
    kept_rows = done_rows = min(len(ids), start * shard_rows)
    log.info("feature cache: %d of %d shards already in %s (sha256 checked); continuing",
             start, num_shards, out_dir)
  for s in range(start, num_shards):
    shard_ids = ids[s * shard_rows:(s + 1) * shard_rows]
    pending = []
    for b in range(0, len(shard_ids), g):  # dispatch the shard's batches, then pull them
      global_ids = np.full([g], -1, np.int64)
      chunk = shard_ids[b:b + g]
      global_ids[:len(chunk)] = chunk
      rows = make_global_batch(train_it.local_batch(global_ids), mesh)
      rows["hidden"] = features(base_params, rows["tokens"], rows["positions"])
      pending.append((len(chunk), rows))
    parts = [{k: v[:n] for k, v in to_host(rows).items()} for n, rows in pending]
    if is_main:
      arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      arrays["hidden"] = arrays["hidden"].view(_FILE_DTYPES[dtype])  # bf16 bits as uint16
      arrays["loss_mask"] = arrays["loss_mask"].astype(np.uint8)
      arrays["row_ids"] = np.asarray(shard_ids, np.int64)
      shards.append(_write_shard(out_dir, s, arrays))
      _write_manifest(out_dir, _manifest(header, shards, num_shards, t))
    done_rows += len(shard_ids)
    rate = (done_rows - kept_rows) * t / max(time.perf_counter() - t0, 1e-9)  # this run's
    if is_main:
      log.info("feature cache: shard %d/%d, rows %d/%d, %.0f tokens/s, ETA %.0f s", s + 1,
               num_shards, done_rows, len(ids), rate,
               (len(ids) - done_rows) * t / max(rate, 1e-9))
  if is_main and start == num_shards:  # nothing was missing: the manifest stays as it is
    log.info("feature cache: %s is complete", out_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("hydra_jax:feature_cache_written")
  return read_manifest(out_dir)


def _manifest(header, shards, num_shards: int, seq_len: int) -> Dict[str, Any]:
  rows = sum(s["rows"] for s in shards)
  return dict(header, complete=len(shards) == num_shards, num_shards=num_shards,
              built_rows=rows, tokens=rows * seq_len,
              targets=sum(s["targets"] for s in shards), shards=shards)


# --- reading ----------------------------------------------------------------------------------


def open_feature_cache(path: str, config, base: HFModel,
                       train_it: BatchIterator) -> "FeatureBatchIterator":
  """The run's training batches, read from the cache at `path` after every check passes.

  Raises ConfigError naming the fix for a missing, unfinished or foreign cache (other base
  weights, tokenizer, seq_len or rows) and for a shard that fails its sha256.
  """
  path = os.path.abspath(os.path.expanduser(path))
  manifest = read_manifest(path)
  where = f"data.feature_cache={path!r}"
  if manifest is None:
    raise ConfigError(f"{where} holds no feature cache (no {MANIFEST}); build it with "
                      f"{build_hint(path)}, or set --config.data.feature_cache='' to run the "
                      f"base in every step")
  if not manifest.get("complete"):
    raise ConfigError(f"{where} is unfinished ({len(manifest.get('shards', []))} of "
                      f"{manifest.get('num_shards')} shards); rerun {build_hint(path)} to "
                      f"finish it (finished shards are kept)")
  current = cache_identity(config, base, train_it)
  diffs = _differences(manifest, current, _IDENTITY)
  if diffs:
    what = {"base": "other base weights", "tokenizer": "another tokenizer",
            "seq_len": "another seq_len"}
    first = next((what[k] for k in what if any(x.startswith(k) for x in diffs)),
                 "other training rows (data, template, seed or split)")
    raise ConfigError(f"{where} was built for {first} ({'; '.join(diffs)}); build a cache "
                      f"for this run with {build_hint('NEW_DIR')} and point "
                      f"data.feature_cache at it, or set it to '' to run the base online")
  for entry in manifest["shards"]:
    bad = _bad_file(path, entry)
    if bad is not None:
      raise ConfigError(f"{where}: {bad} is missing or does not match its sha256 in "
                        f"{MANIFEST} (corrupted or changed); rerun {build_hint(path)}: it "
                        f"keeps the intact shards and rewrites this one")
  return FeatureBatchIterator(path, manifest, train_it)


class FeatureBatchIterator(BatchIterator):
  """`train_it`'s batches (same ids, seed, shuffles and state) with the cached features.

  The example ids, rows and fingerprint are `train_it`'s, so its checkpointed state resumes
  here and vice versa; `_batch` reads the rows from the shards (memory-mapped) instead, with
  "hidden" [B, T, D] (bfloat16 or float32) beside tokens, positions and loss_mask.
  """

  def __init__(self, path: str, manifest: Dict[str, Any], train_it: BatchIterator):
    super().__init__(train_it.rows, train_it.indices, train_it.seq_len,
                     train_it.global_batch_size, train_it.seed, train_it.process_index,
                     train_it.process_count, train_it.pad_id, name=train_it.name)
    self.path, self.dtype = path, manifest["dtype"]
    self.shard_rows, self.hidden_size = int(manifest["shard_rows"]), int(manifest["hidden_size"])
    self._shards = [{name: np.load(os.path.join(path, rec["file"]), mmap_mode="r",
                                   allow_pickle=False)
                     for name, rec in entry["files"].items()} for entry in manifest["shards"]]
    if np.any(np.diff(self.indices) <= 0):  # _batch finds rows by binary search
      raise ValueError("FeatureBatchIterator needs the training ids in ascending order "
                       "(build_datasets makes them so)")
    row_ids = np.concatenate([s["row_ids"] for s in self._shards])
    if not np.array_equal(row_ids, self.indices):  # the fingerprint matched: a broken build
      raise ConfigError(f"data.feature_cache={path!r} holds other rows than this run's "
                        f"training split; rebuild it with {build_hint(path)}")

  def _batch(self, ids: np.ndarray) -> Dict[str, np.ndarray]:
    b, t, d = self.local_batch_size, self.seq_len, self.hidden_size
    tokens = np.full([b, t], self.pad_id, np.int32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32)[None, :], (b, t)).copy()
    mask = np.zeros([b, t], np.float32)
    hidden = np.zeros([b, t, d], _FILE_DTYPES[self.dtype])
    where = np.searchsorted(self.indices, ids)  # ascending ids: cache position of each row
    for r, (i, p) in enumerate(zip(ids, where)):
      if i < 0:
        continue  # a padding row: pad tokens, loss_mask 0
      shard = self._shards[p // self.shard_rows]
      o = p % self.shard_rows
      tokens[r], positions[r] = shard["tokens"][o], shard["positions"][o]
      mask[r], hidden[r] = shard["loss_mask"][o], shard["hidden"][o]
    if self.dtype == "bfloat16":
      hidden = hidden.view(ml_dtypes.bfloat16)
    return {"tokens": tokens, "positions": positions, "loss_mask": mask, "hidden": hidden}


# --- command line -----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
  from absl import flags
  from ml_collections import config_flags
  argv = list(sys.argv if argv is None else argv)
  if any(a.split("=")[0] in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(__doc__)
    print("flags: --config FILE (required), --out DIR, --dtype bfloat16|float32, --shard_rows N,"
          " --config.FIELD=VALUE")
    return 0
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Training config (configs/NAME.py); override "
                                  "fields with --config.a.b=value, as for train.py.",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("out", None, "Cache directory (default: the config's data.feature_cache).",
                      flag_values=fv)
  flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "Stored hidden-state dtype.",
                    flag_values=fv)
  flags.DEFINE_integer("shard_rows", 0, "Rows per shard (0: ~64 MiB of hidden states).",
                       flag_values=fv)
  try:
    fv(argv)
    config = fv["config"].value
    if config is None:
      raise ValueError("pass --config configs/NAME.py")
    out = fv["out"].value or config.data.feature_cache
    if not out:
      raise ValueError("pass --out DIR (or set --config.data.feature_cache=DIR)")
  except Exception as e:  # noqa: BLE001 - flags, config file and overrides: one line, exit 2
    print(f"feature_cache: error: {e}", file=sys.stderr, flush=True)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  from hydra_jax.model.config import UnsupportedModelError
  from hydra_jax.model.heads import HeadsMismatchError
  from hydra_jax.registry.embedded import EmbeddedAssetError
  t0 = time.perf_counter()
  try:
    manifest = build_feature_cache(config, out, dtype=fv["dtype"].value,
                                   shard_rows=fv["shard_rows"].value)
  except (TrainingError, CheckpointError, HeadsMismatchError, UnsupportedModelError,
          EmbeddedAssetError) as e:
    print(f"feature_cache: error: {e}", file=sys.stderr, flush=True)
    return 2
  if jax.process_index() == 0:
    print(f"{out}: {manifest['built_rows']} rows, {manifest['tokens']} tokens "
          f"({manifest['targets']} targets) in {len(manifest['shards'])} shards, "
          f"{manifest['dtype']}, {time.perf_counter() - t0:.0f} s; train with "
          f"--config.data.feature_cache={out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
