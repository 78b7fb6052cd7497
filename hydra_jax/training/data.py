"""Training data for head distillation: deterministic, resumable, per-process batches.

Sources (data.source):
  sharegpt  JSON list or JSONL of chat records, one conversation per row, truncated or
            right-padded to seq_len; loss on assistant tokens only (templates.py).
  text      plain text files, tokenized once into one stream (EOS after each file) and cut
            into seq_len windows; every token is trained.
  tfds      a TFDS text dataset read with `tfds.data_source` from a local data_dir (no
            TensorFlow needed); documents are tokenized and packed like `text`.

Every process loads and tokenizes the same records in the same order, so all processes
agree on the held-out split and on each epoch's order without communicating. Epoch e's
order is a permutation drawn from (seed, e); global batch i is rows [i*G, (i+1)*G) of that
order, and process p materialises only rows [p*B, (p+1)*B) of it (B = G / process_count).
N processes together therefore see exactly what one process would, and the iterator state
(epoch, position) is global: it resumes exactly, even on a different number of processes.

Batch (numpy, local rows): tokens int32 [B, T], positions int32 [B, T],
loss_mask float32 [B, T] (1 where the token is a training target).
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from hydra_jax.training import config_base, templates
from hydra_jax.training.errors import DataError, DataFileNotFoundError, MissingDependencyError

log = logging.getLogger(__name__)

SOURCES = ("sharegpt", "text", "tfds")
_SPLIT_SALT, _SHUFFLE_SALT = 0x5EED5, 0x5AFF1E
_TEXT_CHUNK_CHARS = 1 << 22  # tokenize big files in newline-aligned chunks of ~4M characters


def default_data_config() -> ml_collections.ConfigDict:
  """The data section of base_config() (where each field is described), to edit and pass on."""
  return config_base.base_config().data


def _config_dict(data_cfg) -> Dict[str, Any]:
  cfg = config_base.section("data", data_cfg)
  if cfg["source"] not in SOURCES:
    raise DataError(f"data.source={cfg['source']!r}; use one of {', '.join(SOURCES)}")
  if not 0.0 <= float(cfg["eval_fraction"]) < 1.0:
    raise DataError(f"data.eval_fraction={cfg['eval_fraction']} must be in [0, 1)")
  return cfg


def read_text(fname: str) -> str:
  """A data file's text; a file that is not UTF-8 is an error naming the line."""
  try:
    with open(fname, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"cannot read data file {fname}: {e.strerror}; fix data.path") from e
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise DataError(f"{fname}:{line}: not UTF-8 (byte {e.start}); convert the file to UTF-8 "
                    f"(e.g. iconv -t UTF-8) or fix data.path") from e


# ----------------------------------------------------------------------------- reading


def expand_paths(path: str) -> List[str]:
  """A file, a glob, a directory data set (its shard-*.jsonl, as the Magpie recipe writes
  them), or a comma-separated list of them; sorted within each glob or directory."""
  files: List[str] = []
  for part in [p.strip() for p in str(path).split(",") if p.strip()]:
    part = os.path.expanduser(part)
    if os.path.isdir(part):
      shards = sorted(glob.glob(os.path.join(glob.escape(part), "shard-*.jsonl")))
      if not shards:
        raise DataFileNotFoundError(f"data.path: {part} is a directory without shard-*.jsonl "
                                    "files; give a file or a glob (e.g. DIR/*.jsonl)")
      files.extend(shards)
      continue
    matches = sorted(glob.glob(part))
    files.extend(m for m in matches if os.path.isfile(m))
  if not files:
    raise DataFileNotFoundError(f"data.path={path!r} matches no file; give a file, a glob or "
                                "a comma-separated list")
  return files


def read_json_records(path: str) -> List[Any]:
  """Records from JSON files (a top-level list) or JSONL, in file order.

  A JSONL line that does not parse is a record-level problem (counted, skipped); a .json file
  that does not parse as a whole cannot be split into records, so that is an error.
  """
  records: List[Any] = []
  for fname in expand_paths(path):
    text = read_text(fname)
    if text.lstrip()[:1] == "[":
      try:
        data = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataError(f"{fname} starts with '[' but is not valid JSON ({e}); fix it or write "
                         "it as JSONL, one record per line") from e
      records.extend(data)
      continue
    for line in text.splitlines():
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        records.append(_BadJson())  # counted as "invalid_json" when the records are checked
  return records


class _BadJson:
  """Placeholder for an unparseable JSONL line, so record indices stay line-stable."""


def _tokenize_documents(docs: Sequence[str], tokenizer) -> np.ndarray:
  """One int32 stream: each document's tokens followed by EOS (when the tokenizer has one)."""
  eos = tokenizer.eos_token_id
  chunks: List[str] = []
  ends_doc: List[bool] = []
  for doc in docs:
    # Split very long documents at newlines so the tokenizer never holds a huge string.
    start = 0
    while True:
      end = min(len(doc), start + _TEXT_CHUNK_CHARS)
      if end < len(doc):
        nl = doc.rfind("\n", start, end)
        end = nl + 1 if nl > start else end
      chunks.append(doc[start:end])
      ends_doc.append(end >= len(doc))
      start = end
      if start >= len(doc):
        break
  pieces: List[np.ndarray] = []
  for i in range(0, len(chunks), 1024):  # batched calls: the Rust tokenizer runs them in parallel
    encoded = tokenizer(chunks[i:i + 1024], add_special_tokens=False)["input_ids"]
    for ids, last in zip(encoded, ends_doc[i:i + 1024]):
      pieces.append(np.asarray(ids, np.int32))
      if last and eos is not None:
        pieces.append(np.asarray([eos], np.int32))
  return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)


def read_tfds_documents(name: str, split: str, data_dir: str, text_key: str,
                        max_records: int = 0) -> List[str]:
  """Texts of a TFDS dataset via `tfds.data_source` (ArrayRecord, random access, no TF)."""
  try:
    import tensorflow_datasets as tfds  # optional: pip install 'hydra_jax[tfds]'
  except ImportError as e:
    raise MissingDependencyError("data.source='tfds' needs tensorflow-datasets: "
                      "pip install 'hydra_jax[tfds]' (TensorFlow itself is not needed)") from e
  if not name:
    raise DataError("data.source='tfds' needs data.tfds_name (e.g. 'lm1b')")
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  n = len(source) if not max_records else min(len(source), int(max_records))
  docs: List[str] = []
  for start in range(0, n, 1024):
    keys = list(range(start, min(n, start + 1024)))
    try:  # batched reads are much faster on ArrayRecord files
      examples = source.__getitems__(keys)
    except (AttributeError, TypeError):
      # tfds.testing.mock_data (4.9.10) installs an unbound __getitems__; one by one works.
      examples = [source[k] for k in keys]
    for ex in examples:
      if text_key not in ex:
        raise DataError(f"TFDS {name} examples have no feature {text_key!r}; set "
                       f"data.tfds_text_key to one of {sorted(ex)}")
      text = ex[text_key]
      if isinstance(text, np.ndarray):
        text = text.item()
      docs.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
  return docs


# ----------------------------------------------------------------------------- row stores


class RaggedRows:
  """Variable-length rows (one conversation each) in flat arrays; cut/padded on access."""

  def __init__(self, tokens: List[np.ndarray], masks: List[np.ndarray]):
    lengths = np.asarray([len(t) for t in tokens], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    self.tokens = np.concatenate(tokens).astype(np.int32) if tokens else np.zeros([0], np.int32)
    self.masks = np.concatenate(masks).astype(np.uint8) if masks else np.zeros([0], np.uint8)
    self.checksum = zlib.crc32(self.masks.tobytes(), zlib.crc32(self.tokens.tobytes()))

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def fill(self, i: int, tokens_T: np.ndarray, mask_T: np.ndarray) -> None:
    a, b = self.offsets[i], self.offsets[i + 1]
    n = min(int(b - a), len(tokens_T))
    tokens_T[:n] = self.tokens[a:a + n]
    mask_T[:n] = self.masks[a:a + n]


class WindowRows:
  """seq_len windows of one token stream (packing); every token is a target."""

  def __init__(self, stream: np.ndarray, seq_len: int):
    self.stream, self.seq_len = stream, seq_len
    self.checksum = zlib.crc32(stream[:len(self) * seq_len].tobytes())

  def __len__(self) -> int:
    return len(self.stream) // self.seq_len

  def fill(self, i: int, tokens_T: np.ndarray, mask_T: np.ndarray) -> None:
    tokens_T[:] = self.stream[i * self.seq_len:(i + 1) * self.seq_len]
    mask_T[:] = 1


# ----------------------------------------------------------------------------- iterator


class BatchIterator:
  """Infinite, deterministically reshuffled batches of this process's rows of each global batch.

  `indices` are the example ids (into `rows`) of this split. Incomplete global batches at
  the end of an epoch are dropped for training, so every step has the same shape and all
  processes run the same number of steps; `eval_batches` instead pads the last one with
  rows whose loss_mask is 0.
  """

  def __init__(self, rows, indices: np.ndarray, seq_len: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, pad_id: int = 0,
               name: str = "train"):
    if global_batch_size % process_count:
      raise DataError(f"global_batch_size {global_batch_size} is not divisible by the "
                       f"{process_count} processes; make it a multiple of {process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.rows, self.indices = rows, np.asarray(indices, np.int64)
    self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, int(seed)
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = global_batch_size // process_count
    self.pad_id, self.name = int(pad_id), name
    self.steps_per_epoch = len(self.indices) // global_batch_size
    self.epoch, self.position = 0, 0
    self._order_epoch, self._order = -1, None
    # Identifies the data the state refers to, so a resume on different data fails loudly.
    self.fingerprint = (f"{len(self.indices)}:{zlib.crc32(self.indices.tobytes()):08x}:"
                        f"{getattr(rows, 'checksum', 0):08x}")

  @property
  def num_examples(self) -> int:
    return len(self.indices)

  def __len__(self) -> int:
    return self.steps_per_epoch

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    return self

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Example ids of `epoch` in training order; a pure function of (seed, epoch)."""
    if epoch != self._order_epoch:
      rng = np.random.default_rng([self.seed, _SHUFFLE_SALT, epoch])
      self._order, self._order_epoch = self.indices[rng.permutation(len(self.indices))], epoch
    return self._order

  def local_batch(self, global_ids: np.ndarray) -> Dict[str, np.ndarray]:
    """This process's rows of the global batch of example ids `global_ids` (-1: padding)."""
    b = self.local_batch_size
    return self._batch(global_ids[self.process_index * b:(self.process_index + 1) * b])

  def _batch(self, ids: np.ndarray) -> Dict[str, np.ndarray]:
    """Rows for example ids; id -1 is a padding row (pad tokens, loss_mask 0)."""
    b, t = self.local_batch_size, self.seq_len
    tokens = np.full([b, t], self.pad_id, np.int32)
    mask = np.zeros([b, t], np.uint8)
    for r, i in enumerate(ids):
      if i >= 0:
        self.rows.fill(int(i), tokens[r], mask[r])
    positions = np.broadcast_to(np.arange(t, dtype=np.int32)[None, :], (b, t)).copy()
    return {"tokens": tokens, "positions": positions, "loss_mask": mask.astype(np.float32)}

  def __next__(self) -> Dict[str, np.ndarray]:
    if self.steps_per_epoch == 0:
      raise DataError(f"the {self.name} split has {self.num_examples} examples, fewer than "
                       f"global_batch_size {self.global_batch_size}; lower the batch size or "
                       "add data")
    g = self.global_batch_size
    order = self.epoch_order(self.epoch)
    batch = self.local_batch(order[self.position * g:(self.position + 1) * g])
    self.position += 1
    if self.position == self.steps_per_epoch:
      self.epoch, self.position = self.epoch + 1, 0
    return batch

  def eval_batches(self, max_batches: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """One pass in fixed order (not shuffled, state untouched); the last batch is padded."""
    g = self.global_batch_size
    n = -(-self.num_examples // g)
    if max_batches:
      n = min(n, int(max_batches))
    for i in range(n):
      ids = np.full([g], -1, np.int64)
      chunk = self.indices[i * g:(i + 1) * g]
      ids[:len(chunk)] = chunk
      yield self.local_batch(ids)

  def get_state(self) -> Dict[str, Any]:
    """JSON-able; the same on every process (it counts global batches)."""
    return {"epoch": int(self.epoch), "position": int(self.position), "seed": self.seed,
            "global_batch_size": self.global_batch_size, "fingerprint": self.fingerprint}

  def set_state(self, state: Dict[str, Any]) -> None:
    mine = self.get_state()
    for key in ("seed", "global_batch_size", "fingerprint"):
      if key in state and state[key] != mine[key]:
        raise DataError(
            f"data iterator state was saved with {key}={state[key]!r} but this run has "
            f"{mine[key]!r}; resume with the same data, seed and global_batch_size, or start "
            "from a fresh workdir")
    epoch, position = int(state["epoch"]), int(state["position"])
    if not 0 <= position < max(1, self.steps_per_epoch):
      raise DataError(f"data iterator position {position} is outside the epoch's "
                       f"{self.steps_per_epoch} steps")
    self.epoch, self.position = epoch, position


# ----------------------------------------------------------------------------- building


def split_indices(num_records: int, eval_fraction: float, seed: int) -> np.ndarray:
  """Boolean is-eval per record: the first ceil(fraction * N) of a seeded permutation.

  Decided on record indices before any filtering, so a record's side of the split does not
  depend on which other records are malformed.
  """
  n_eval = int(np.ceil(eval_fraction * num_records)) if eval_fraction > 0 else 0
  perm = np.random.default_rng([int(seed), _SPLIT_SALT]).permutation(num_records)
  is_eval = np.zeros([num_records], bool)
  is_eval[perm[:n_eval]] = True
  return is_eval


def _chat_rows(cfg, tokenizer, seq_len: int, stats: Dict[str, Any]):
  records = read_json_records(cfg["path"])
  if cfg["max_records"]:
    records = records[:int(cfg["max_records"])]
  skipped: Dict[str, int] = collections.Counter()
  first_skip: Dict[str, Dict[str, Any]] = {}
  tokens, masks, kept = [], [], []
  truncated = 0

  def skip(i, e):
    skipped[e.reason] += 1
    first_skip.setdefault(e.reason, {"index": i, "detail": e.detail})

  for start in range(0, len(records), 512):  # render a chunk, then tokenize it in one call
    rendered, where = [], []
    for i in range(start, min(len(records), start + 512)):
      try:
        if isinstance(records[i], _BadJson):
          raise templates.MalformedRecord("invalid_json")
        msgs = templates.normalize_conversation(records[i])
        rendered.append(templates.render_conversation(msgs, tokenizer, cfg["template"],
                                                      cfg["system_prompt"] or None))
        where.append(i)
      except templates.MalformedRecord as e:
        skip(i, e)
    for i, (ids, mask) in zip(where, templates.tokenize_rendered(tokenizer, rendered)):
      if not mask[:seq_len].any():
        skip(i, templates.MalformedRecord("no_assistant_tokens_within_seq_len",
                                          f"{len(ids)} tokens"))
        continue
      truncated += len(ids) > seq_len
      tokens.append(ids[:seq_len])
      masks.append(mask[:seq_len])
      kept.append(i)
  stats.update(records=len(records), skipped=dict(skipped), skipped_examples=first_skip,
               truncated=truncated)
  if skipped:
    log.warning("data: skipped %d of %d records (%s); first of each: %s", sum(skipped.values()),
                len(records), ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())),
                first_skip)
  if not kept:
    raise DataError(f"no usable conversations in data.path={cfg['path']!r}: "
                     f"{len(records)} records, skipped {dict(skipped)} (first of each: "
                     f"{first_skip}); check the file format and data.template")
  is_eval = split_indices(len(records), float(cfg["eval_fraction"]), stats["seed"])[kept]
  return RaggedRows(tokens, masks), is_eval


def _stream_rows(cfg, tokenizer, seq_len: int, stats: Dict[str, Any]):
  if cfg["source"] == "text":
    docs = [read_text(fname) for fname in expand_paths(cfg["path"])]
    where = f"data.path={cfg['path']!r}"
  else:
    docs = read_tfds_documents(cfg["tfds_name"], cfg["tfds_split"], cfg["tfds_data_dir"],
                               cfg["tfds_text_key"], int(cfg["max_records"]))
    where = f"TFDS {cfg['tfds_name']!r} split {cfg['tfds_split']!r}"
  stream = _tokenize_documents(docs, tokenizer)
  rows = WindowRows(stream, seq_len)
  n = len(rows)
  if cfg["source"] == "text" and cfg["max_records"]:
    n = min(n, int(cfg["max_records"]))
    rows = WindowRows(stream[:n * seq_len], seq_len)
  stats.update(records=n, documents=len(docs), stream_tokens=int(len(stream)), skipped={})
  if n == 0:
    raise DataError(f"{where} has {len(stream)} tokens, fewer than one seq_len={seq_len} "
                     "window; add text or lower seq_len")
  return rows, split_indices(n, float(cfg["eval_fraction"]), stats["seed"])


def build_datasets(data_cfg, tokenizer, seq_len: int, global_batch_size: int, seed: int,
                   process_index: Optional[int] = None, process_count: Optional[int] = None,
                   *, max_len: Optional[int] = None):
  """(train BatchIterator, eval BatchIterator, stats dict) for this process.

  `max_len` is the model's max_position_embeddings; a longer seq_len is an error.
  process_index/process_count default to jax.process_index()/jax.process_count().
  """
  cfg = _config_dict(data_cfg)
  if seq_len < 2:
    raise DataError(f"seq_len={seq_len}: head targets lie 2+ tokens ahead; use seq_len >= 2")
  if max_len is not None and seq_len > max_len:
    raise DataError(f"seq_len={seq_len} is beyond the model's max_position_embeddings="
                     f"{max_len}; set seq_len <= {max_len}")
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if cfg["source"] in ("sharegpt", "text") and cfg.get("missing_hint"):
    # A recipe whose data is generated (self-distillation, Magpie) says how to make it; the
    # config loads without the file, so the check is here, when training starts.
    try:
      expand_paths(cfg["path"])
    except DataFileNotFoundError as e:
      raise DataFileNotFoundError(f"{cfg['path']} does not exist: {cfg['missing_hint']}") from e
  stats: Dict[str, Any] = {"source": cfg["source"], "seed": int(seed), "seq_len": seq_len}
  if cfg["source"] == "sharegpt":
    rows, is_eval = _chat_rows(cfg, tokenizer, seq_len, stats)
  else:
    rows, is_eval = _stream_rows(cfg, tokenizer, seq_len, stats)
  pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
  ids = np.arange(len(rows))
  common = dict(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                process_index=process_index, process_count=process_count, pad_id=pad_id)
  train = BatchIterator(rows, ids[~is_eval], name="train", **common)
  evals = BatchIterator(rows, ids[is_eval], name="eval", **common)
  target_tokens = _count_targets(rows, train.indices, seq_len)
  stats.update(train_examples=train.num_examples, eval_examples=evals.num_examples,
               steps_per_epoch=train.steps_per_epoch,
               eval_batches=-(-evals.num_examples // global_batch_size),
               train_target_tokens=target_tokens)
  if train.steps_per_epoch == 0:
    raise DataError(f"{train.num_examples} training examples make no full global batch of "
                     f"{global_batch_size}; lower global_batch_size or add data")
  log.info("data: %s", {k: v for k, v in stats.items() if k != "skipped_examples"})
  return train, evals, stats


def draft_vocabulary(train: "BatchIterator", vocab_size: int, size: int) -> Tuple[int, ...]:
  """The `size` most frequent target tokens of the TRAINING rows, most frequent first.

  The heads' draft vocabulary (EAGLE-3, FR-Spec): what the heads will be asked to predict
  is what the training targets hold. Ties go to the lower id, so the list is reproducible.
  """
  rows, indices = train.rows, train.indices
  if isinstance(rows, WindowRows):
    tokens = np.concatenate([rows.stream[i * rows.seq_len:(i + 1) * rows.seq_len]
                             for i in indices]) if len(indices) else np.zeros([0], np.int32)
  else:
    keep = np.zeros(len(rows.tokens), bool)
    for i in indices:
      a, b = rows.offsets[i], rows.offsets[i + 1]
      keep[a:b] = rows.masks[a:b] > 0
    tokens = rows.tokens[keep]
  return tuple(int(i) for i in rank_tokens(tokens, vocab_size)[:size])


def rank_tokens(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  """All token ids by frequency in `tokens`, count descending, ties to the lower id."""
  counts = np.bincount(tokens, minlength=vocab_size)[:vocab_size]
  return np.lexsort((np.arange(vocab_size), -counts))


def _count_targets(rows, indices: np.ndarray, seq_len: int) -> int:
  if isinstance(rows, WindowRows):
    return int(len(indices) * seq_len)
  per_row = np.add.reduceat(rows.masks.astype(np.int64), rows.offsets[:-1]) if len(rows) else []
  return int(np.asarray(per_row)[indices].sum()) if len(indices) else 0
