"""The library entry points: `load_model` and `generate`.

`generate` is a pipeline of small functions that a speculative engine reuses as they are:
`encode_prompts` (text / chat / token ids -> validated ids), `plan_shapes` (bucketed padded
prompt length and cache length, so that new prompts and max_new_tokens rarely recompile),
`prepare_batch` (right-padded batches in input order, dummy rows to keep shapes) and
`make_results` (host-side outputs -> GenerationResult). Only `engine.run` is mode-specific.

    model = load_model("path/to/hf_dir", dtype="bfloat16")
    [res] = generate(model, ["Once upon a time"], max_new_tokens=64, temperature=0.7, top_p=0.9)
    print(res.text, res.tokens_per_s)

Sharded over a device mesh (tensor parallel over "tensor", batch over "data"; all devices of
all processes under jax.distributed), loading each device's slices straight from the files:

    model = load_model("path/to/hf_dir", dtype="bfloat16", mesh="data=2,tensor=4")
    results = generate(model, prompts, 64, mesh="data=2,tensor=4")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.checkpoint.heads_io import load_heads
from hydra_jax.checkpoint.hf import CheckpointError, HFModel, load_hf_model
from hydra_jax.parallel import mesh as decode_mesh
from hydra_jax.decoding import dtype_choice
from hydra_jax.decoding.acceptance import DEFAULT_POSTERIOR_ALPHA, DEFAULT_POSTERIOR_THRESHOLD
from hydra_jax.decoding.engine import DecodeEngine
from hydra_jax.decoding.sampling import SamplingParams
from hydra_jax.decoding.state import FINISH_REASONS, BatchOutput, StopCriteria
from hydra_jax.decoding.prompt_files import PromptFileError
from hydra_jax.decoding.tree import TreeError, resolve_tree
from hydra_jax.model.config import UnsupportedModelError
from hydra_jax.model.heads import HeadsConfig, HeadsMismatchError
from hydra_jax.registry.models import RegistryError

log = logging.getLogger("hydra_jax.decoding")

Prompt = Union[str, Sequence[int]]

PROMPT_BUCKET = 16  # padded prompt lengths are multiples of this
CACHE_BUCKET = 128  # default cache lengths are multiples of this (capped by max positions)


class DecodeInputError(ValueError):
  """Bad input to generate / decode.py (empty prompt, prompt longer than the cache, ...)."""


# What the command-line tools (decode.py, tree_fit, bench, demo) report as bad input: one
# line naming the fix and exit code 2, no traceback. Each tool adds its own usage error.
INPUT_ERRORS = (DecodeInputError, PromptFileError, CheckpointError, UnsupportedModelError,
                TreeError, HeadsMismatchError, RegistryError)


@dataclasses.dataclass
class GenerationResult:
  prompt_ids: List[int]
  output_ids: List[int]  # new tokens only; the stop token is included when one was generated
  text: Optional[str]  # decoded output_ids (None without a tokenizer)
  new_tokens: int
  steps: int  # base-model forward passes after prefill while this row ran
  tokens_per_s: float  # new_tokens / wall time of its batch (prefill + decode, no compile)
  finish_reason: str  # "eos" | "stop" | "length" | "cache_full"
  time_s: float = 0.0  # wall time of its batch, compile excluded
  compile_s: float = 0.0  # compile time spent before its batch (0 when reused)
  batch: int = 0  # index of the batch it ran in (rows of a batch share time_s)
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # mode-specific stats

  def to_json(self) -> Dict[str, Any]:
    out = {"output_ids": self.output_ids, "text": self.text, "new_tokens": self.new_tokens,
           "steps": self.steps, "tokens_per_s": self.tokens_per_s,
           "finish_reason": self.finish_reason, "prompt_tokens": len(self.prompt_ids),
           "time_s": self.time_s, "compile_s": self.compile_s}
    out.update(self.extra)
    return out


# --- loading -------------------------------------------------------------------------------

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(model) -> str:
  """"float32" / "bfloat16": the dtype a model was loaded in, as the command lines spell it."""
  return str(jnp.dtype(model.dtype))


def resolve_mesh(mesh):
  """A decode Mesh from "data=D,tensor=T", a dict or a jax Mesh (None stays None); a mesh
  decoding cannot use raises DecodeInputError."""
  try:
    return decode_mesh.make_decode_mesh(mesh)
  except decode_mesh.MeshError as e:
    raise DecodeInputError(str(e)) from None


def load_model(path: str, dtype: str = "float32", tokenizer: bool = True,
               mesh=None) -> HFModel:
  """Loads a model; `dtype` is both the param and the compute dtype ("auto": the platform's
  default, see dtype_choice; with draft heads, resolve it first with
  dtype_choice.resolve_dtype(dtype, heads_dir), which reads their measured choice).

  `path`: a Hugging Face model directory, a llama.cpp .gguf file, or the name of a known model
  (`python -m hydra_jax.registry.models list`; prepared in the cache on first use). With a `mesh`
  (see `generate`), each process reads only the slices of the weights its devices hold and
  the params come back sharded for decoding on that mesh.
  """
  if str(dtype) == dtype_choice.DTYPE_AUTO:  # no heads here: the platform's default
    dtype, why = dtype_choice.resolve_dtype(dtype)
    dtype_choice.announce(dtype, why)
  if str(dtype) not in _DTYPES:
    raise DecodeInputError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
  dt = _DTYPES[str(dtype)]
  mesh = resolve_mesh(mesh)
  path = os.fspath(path)
  if not os.path.exists(os.path.expanduser(path)):
    from hydra_jax.registry import models
    if path in models.REGISTRY:
      path = models.model_path(path)
  if mesh is not None:
    from hydra_jax.checkpoint.sharded_load import load_model_sharded
    return load_model_sharded(path, mesh, param_dtype=dt, dtype=dt, tokenizer=tokenizer)
  if path.endswith(".gguf"):
    from hydra_jax.checkpoint.gguf import load_gguf_model
    return load_gguf_model(path, param_dtype=dt, dtype=dt, tokenizer=tokenizer)
  return load_hf_model(path, param_dtype=dt, dtype=dt, tokenizer=tokenizer)


def eos_ids(model: HFModel) -> Tuple[int, ...]:
  """EOS ids from config.json and, when present, generation_config.json (Llama-3 lists two)."""
  ids = set(model.config.eos_token_ids)
  gen_file = os.path.join(model.path or "", "generation_config.json")
  if model.path and os.path.isfile(gen_file):
    with open(gen_file) as f:
      eos = json.load(f).get("eos_token_id")
    ids |= set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
  return tuple(sorted(int(i) for i in ids))


# --- prompts and shapes ----------------------------------------------------------------------


def normalize_prompts(prompts) -> List[Prompt]:
  """A single string or a single list of ids is one prompt; otherwise a list of prompts."""
  if isinstance(prompts, str):
    return [prompts]
  prompts = list(prompts)
  if prompts and all(isinstance(p, (int, np.integer)) for p in prompts):
    return [prompts]
  return prompts


def encode_prompts(model: HFModel, prompts, chat: bool = False) -> List[List[int]]:
  """Text (optionally through the chat template) or token ids -> validated token id lists."""
  prompts = normalize_prompts(prompts)
  if not prompts:
    raise DecodeInputError("no prompts given")
  tok = model.tokenizer
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if not p:
        raise DecodeInputError(f"prompt {i} is empty: give at least one character or token id")
      if tok is None:
        raise DecodeInputError(f"prompt {i} is text but {model.path} has no tokenizer: pass "
                               f"token ids (\"prompt_ids\") instead")
      if chat:
        if not getattr(tok, "chat_template", None):
          raise DecodeInputError(f"--chat: the tokenizer in {model.path} has no chat template; "
                                 f"drop --chat or use a model directory whose tokenizer_config "
                                 f"has one")
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
      else:
        ids = tok(p)["input_ids"]
    elif isinstance(p, (list, tuple, np.ndarray)) and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in p):
      ids = [int(x) for x in p]
    else:
      raise DecodeInputError(f"prompt {i} must be text or a list of token ids (ints), got "
                             f"{_describe(p)}")
    if not ids:
      raise DecodeInputError(f"prompt {i} is empty: give at least one character or token id")
    bad = [x for x in ids if not 0 <= x < model.config.vocab_size]
    if bad:
      raise DecodeInputError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                             f"[0, {model.config.vocab_size})")
    out.append(ids)
  return out


def _describe(x) -> str:
  if isinstance(x, (list, tuple)):
    bad = next((v for v in x if not isinstance(v, (int, np.integer)) or isinstance(v, bool)), None)
    return f"a list holding {bad!r} ({type(bad).__name__})"
  return f"{x!r} ({type(x).__name__})"


def _whole_number(name: str, value, minimum: int = 1) -> int:
  """An int >= minimum, or a DecodeInputError naming the argument (4.5 is not 4)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
      isinstance(value, float) and value.is_integer()):
    raise DecodeInputError(f"{name} must be a whole number >= {minimum}, got {value!r}")
  if int(value) < minimum:
    raise DecodeInputError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def plan_shapes(prompt_lens: Sequence[int], max_new_tokens: int, max_positions: int,
                cache_len: Optional[int] = None, extra_slots: int = 0) -> Tuple[int, int]:
  """(padded prompt length P, cache length S), bucketed so that shapes repeat across calls.

  By default S = prompt + max_new_tokens (+ `extra_slots`, e.g. a speculative tree) rounded up
  to a multiple of 128 and capped at the model's max positions: another max_new_tokens in the
  same bucket, or another prompt of the same padded length, reuses the compiled code.
  """
  longest = max(prompt_lens)
  if longest > max_positions:
    raise DecodeInputError(f"a prompt has {longest} tokens but the model handles at most "
                           f"{max_positions} positions (max_position_embeddings): shorten it")
  if cache_len is None:
    cache_len = min(_round_up(longest + max_new_tokens + extra_slots, CACHE_BUCKET), max_positions)
  elif cache_len > max_positions:
    raise DecodeInputError(f"cache length {cache_len} exceeds the model's "
                           f"max_position_embeddings {max_positions}: pass --cache-len <= "
                           f"{max_positions}")
  if longest + extra_slots >= cache_len:
    raise DecodeInputError(f"a prompt has {longest} tokens, which leaves no room in a KV cache "
                           f"of {cache_len} slots: shorten the prompt or pass a larger "
                           f"--cache-len / cache_len (at most {max_positions})")
  return min(_round_up(longest, PROMPT_BUCKET), cache_len), cache_len


@dataclasses.dataclass
class PreparedBatch:
  tokens: np.ndarray  # int32 [B, P], right-padded
  lengths: np.ndarray  # int32 [B]
  active: np.ndarray  # bool [B]: False for dummy rows that fill the last batch
  row_ids: np.ndarray  # int32 [B]: index of the prompt in the caller's list
  indices: List[int]  # the real rows' prompt indices, in order


def prepare_batch(prompt_ids: Sequence[Sequence[int]], start: int, batch_size: int,
                  padded_len: int, pad_id: int = 0, rows: Optional[int] = None) -> PreparedBatch:
  """Prompts [start, start + batch_size) as one right-padded batch of `rows` rows (default
  batch_size; more on a mesh, whose data axis must divide it): the rest are dummy rows."""
  rows = batch_size if rows is None else rows
  indices = list(range(start, min(start + batch_size, len(prompt_ids))))
  tokens = np.full((rows, padded_len), pad_id, np.int32)
  lengths = np.ones((rows,), np.int32)  # dummy rows: one pad token, never decoded
  active = np.zeros((rows,), bool)
  row_ids = np.full((rows,), -1, np.int32)
  for r, i in enumerate(indices):
    ids = prompt_ids[i]
    tokens[r, :len(ids)] = ids
    lengths[r], active[r], row_ids[r] = len(ids), True, i
  return PreparedBatch(tokens, lengths, active, row_ids, indices)


def make_results(model: HFModel, prompt_ids: Sequence[Sequence[int]], batch: PreparedBatch,
                 out: BatchOutput, batch_index: int = 0) -> List[GenerationResult]:
  """One GenerationResult per real row of a finished batch."""
  results = []
  for r, i in enumerate(batch.indices):
    n = int(out.num_generated[r])
    ids = [int(x) for x in out.tokens[r, :n]]
    text = (model.tokenizer.decode(ids, skip_special_tokens=True)
            if model.tokenizer is not None else None)
    results.append(GenerationResult(
        prompt_ids=list(prompt_ids[i]), output_ids=ids, text=text, new_tokens=n,
        steps=int(out.steps[r]), tokens_per_s=n / out.run_s if out.run_s > 0 else 0.0,
        finish_reason=FINISH_REASONS[int(out.finish[r])], time_s=out.run_s,
        compile_s=out.compile_s, batch=batch_index,
        extra={k: np.asarray(v[r]).tolist() for k, v in out.extra.items()}))
  return results


# --- generate --------------------------------------------------------------------------------

_ENGINES: Dict[Tuple, DecodeEngine] = {}


def get_engine(model: HFModel, heads_cfg: Optional[HeadsConfig] = None, tree=None,
               accept: str = "greedy", mesh=None) -> DecodeEngine:
  """One engine (and its compiled executables) per (model config, dtype, heads, tree, accept,
  mesh)."""
  key = (model.config, str(jnp.dtype(model.dtype)), heads_cfg, tree, accept, mesh)
  if key not in _ENGINES:
    _ENGINES[key] = DecodeEngine(model.config, model.dtype, heads_cfg, tree, accept, mesh=mesh)
  return _ENGINES[key]


def load_draft_heads(model: HFModel, heads, allow_mismatch: bool = False
                     ) -> Tuple[HeadsConfig, Any]:
  """`heads` as a directory (ours, or released Hydra / Medusa) or a (HeadsConfig, params) pair.

  Raises HeadsMismatchError when the heads were made for another base model (its config, or
  for our heads also its weights; allow_mismatch=True loads them anyway when shapes fit).
  """
  if isinstance(heads, (tuple, list)):
    if len(heads) != 2 or not isinstance(heads[0], HeadsConfig) or not isinstance(heads[1], dict):
      raise DecodeInputError("heads= must be a heads directory or a (HeadsConfig, params dict) "
                             f"pair, got a {type(heads).__name__} of {len(heads)} items")
    cfg, params = heads
    cfg.check_compatible(model.config)
  elif isinstance(heads, (str, os.PathLike)):
    cfg, params = load_heads(os.fspath(heads), model.config, base_params=model.params,
                             allow_mismatch=allow_mismatch)
  else:
    raise DecodeInputError(f"heads= must be a heads directory or a (HeadsConfig, params) pair, "
                           f"got {type(heads).__name__}")
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, model.dtype), params)
  return cfg, params


def generate(model: Union[HFModel, str], prompts, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             batch_size: Optional[int] = None, chat: bool = False,
             stop_ids: Optional[Sequence[int]] = None,
             cache_len: Optional[int] = None, heads=None, tree="mc_sim_7b_63",
             mode: Optional[str] = None, accept: Optional[str] = None,
             posterior_threshold: float = DEFAULT_POSTERIOR_THRESHOLD,
             posterior_alpha: float = DEFAULT_POSTERIOR_ALPHA,
             allow_heads_mismatch: bool = False, mesh=None) -> List[GenerationResult]:
  """Decodes each prompt (text or token ids); results in input order.

  Greedy at temperature 0, else sampling with top-k (0 = off) and top-p (1.0 = off). Each
  row stops on the model's EOS ids or `stop_ids` (the stop token is kept in output_ids), after
  max_new_tokens, or when prompt + output fill the cache ("cache_full"). Prompts run in
  batches of `batch_size` (default: all at once); the last batch is padded with dummy rows.

  Speculative decoding (mode "spec", the default when `heads` is given): `heads` is a heads
  directory (ours, or a released Hydra / Medusa checkpoint) or a (HeadsConfig, params) pair;
  `tree` a preset name, a JSON file, a CompiledTree or "auto" (HEADS_DIR/tree_auto.json,
  written by `python -m hydra_jax.decoding.tree_fit`; else mc_sim_7b_63 with a warning).
  `accept`: "greedy" (the default at temperature 0; output identical to autoregressive greedy), "exact" (the default otherwise:
  lossless tree rejection sampling) or "typical" (Medusa's typical acceptance, lossy, with
  `posterior_threshold` / `posterior_alpha`). Results then carry `accept_length` and
  `accepted_per_step` in `extra`. Heads recorded for another base model are refused unless
  allow_heads_mismatch=True.

  `mesh` ("data=D,tensor=T", a {"data": D, "tensor": T} dict or a jax Mesh over all devices):
  decode sharded, base params and heads tensor-parallel over "tensor", the batch (and the KV
  caches' rows) over "data" and "tensor"; the tokens are those of the unsharded run. Each
  batch is padded to a multiple of data with rows that start done. Params not yet on the
  mesh are placed on it (load_model(path, mesh=...) loads them there directly).
  """
  mesh = resolve_mesh(mesh)
  if isinstance(model, str):
    model = load_model(model, mesh=mesh)
  mode = mode or ("spec" if heads is not None else "ar")
  if mode not in ("ar", "spec"):
    raise DecodeInputError(f"mode must be 'ar' or 'spec', got {mode!r}")
  if mode == "spec" and heads is None:
    raise DecodeInputError("speculative decoding needs draft heads: pass --heads DIR")
  max_new_tokens = _whole_number("max_new_tokens", max_new_tokens)
  bad_stop = [x for x in (stop_ids or ()) if isinstance(x, bool) or
              not isinstance(x, (int, np.integer)) or not 0 <= int(x) < model.config.vocab_size]
  if bad_stop:
    raise DecodeInputError(f"stop_ids must be token ids in [0, {model.config.vocab_size}), got "
                           f"{bad_stop[0]!r}")
  try:
    sampling = SamplingParams.make(temperature, top_k, top_p)
  except ValueError as e:
    raise DecodeInputError(str(e)) from e
  ids = encode_prompts(model, prompts, chat=chat)
  batch_size = len(ids) if batch_size is None else _whole_number("batch_size", batch_size)
  heads_cfg = heads_params = tree_used = None
  if mode == "spec":
    heads_cfg, heads_params = load_draft_heads(model, heads, allow_heads_mismatch)
    heads_dir = None if isinstance(heads, (tuple, list)) else str(heads)
    tree_used = resolve_tree(tree, heads_dir, num_heads=heads_cfg.num_heads,
                             max_topk=heads_cfg.draft_vocab_size, dtype=dtype_name(model))
    accept = accept or ("greedy" if float(temperature) == 0.0 else "exact")
    if accept not in ("greedy", "typical", "exact"):
      raise DecodeInputError(f"accept must be greedy, typical or exact, got {accept!r}")
    if accept == "greedy" and float(temperature) != 0.0:
      raise DecodeInputError("accept='greedy' needs temperature 0; use accept='exact' (lossless) "
                             "or 'typical' to sample")
  engine = get_engine(model, heads_cfg, tree_used, accept or "greedy", mesh)
  params = model.params
  if mesh is not None:  # placed once for all batches (a no-op when loaded onto this mesh)
    params = decode_mesh.place(params, engine.param_shardings)
    heads_params = (None if heads_params is None
                    else decode_mesh.place(heads_params, engine.heads_shardings))
  rows = decode_mesh.padded_batch_size(batch_size, mesh)
  padded_len, cache_len = plan_shapes([len(x) for x in ids], int(max_new_tokens),
                                      model.config.max_position_embeddings, cache_len,
                                      extra_slots=engine.slots_per_step - 1)
  stop = StopCriteria.make(int(max_new_tokens), eos_ids(model), stop_ids or ())
  pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

  results: List[GenerationResult] = []
  for start in range(0, len(ids), batch_size):
    batch = prepare_batch(ids, start, batch_size, padded_len, pad_id, rows)
    out = engine.run(params, heads_params, batch.tokens, batch.lengths, batch.active,
                     batch.row_ids, sampling, stop, seed, cache_len, posterior_threshold,
                     posterior_alpha)
    if out.compile_s > 0:
      log.info("compiled for batch %d x prompt %d, cache %d%s in %.2fs", rows, padded_len,
               cache_len, f" on mesh {decode_mesh.describe(mesh)}" if mesh else "", out.compile_s)
    new = int(out.num_generated[batch.active].sum())
    log.info("prompts %d-%d: %d new tokens in %.3fs (%.1f tokens/s)", batch.indices[0],
             batch.indices[-1], new, out.run_s, new / max(out.run_s, 1e-9))
    results += make_results(model, ids, batch, out, start // batch_size)
  return results


__all__ = ["DecodeInputError", "GenerationResult", "PreparedBatch", "eos_ids", "encode_prompts",
           "generate", "get_engine", "load_draft_heads", "load_model", "make_results",
           "normalize_prompts", "plan_shapes", "prepare_batch", "resolve_mesh"]
