"""Param-tree layouts of our heads checkpoints across format versions, and the upgrade.

Format 1 (hydra_jax 0.1) stored every matmul on its own: a Hydra first block as
first/{linear,res_connection}/{kernel, bias}, the Hydra++ prefix layer's attention as
self_attn/{q,k,v}_proj and its MLP as mlp/{gate,up}_proj. Format 2 fuses the matmuls that read
the same input (`hydra_jax.model.heads` and `hydra_jax.model.llama` say why):
first/{kernel [in, 2, D], bias [2, D]} (0 = W, 1 = W_res), self_attn/qkv_proj/kernel
[D, K, G + 2, H] (+ bias) and mlp/gate_up_proj/kernel [D, 2, F]. `upgrade_params` turns a
format-1 tree into format 2 exactly (the same numbers, concatenated).
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

FORMAT_VERSION = 2


def upgrade_params(params: Dict[str, Any], from_version: int) -> Dict[str, Any]:
  """A heads param tree of format `from_version` in the current layout (numpy leaves)."""
  if from_version == FORMAT_VERSION:
    return params
  if from_version != 1:
    raise ValueError(f"unknown heads format version {from_version}; this hydra_jax reads "
                     f"versions 1 and {FORMAT_VERSION}")
  out = {}
  for name, sub in params.items():
    sub = dict(sub)
    if name.startswith("heads_") and "first" in sub:
      first = sub["first"]
      lin, res = first["linear"], first["res_connection"]
      sub["first"] = {"kernel": np.stack([np.asarray(lin["kernel"]), np.asarray(res["kernel"])], 1),
                      "bias": np.stack([np.asarray(lin["bias"]), np.asarray(res["bias"])], 0)}
    if name == "prefix_layer":
      sub["self_attn"] = _fuse_attention(sub["self_attn"])
      mlp = dict(sub["mlp"])
      gate, up = mlp.pop("gate_proj")["kernel"], mlp.pop("up_proj")["kernel"]
      mlp["gate_up_proj"] = {"kernel": np.stack([np.asarray(gate), np.asarray(up)], 1)}
      sub["mlp"] = mlp
    out[name] = sub
  return out


def _fuse_attention(attn: Dict[str, Any]) -> Dict[str, Any]:
  """q [D, N, H], k / v [D, K, H] -> qkv [D, K, N / K + 2, H] (per kv head: q group, k, v)."""
  q = np.asarray(attn["q_proj"]["kernel"])
  k = np.asarray(attn["k_proj"]["kernel"])
  v = np.asarray(attn["v_proj"]["kernel"])
  d, n, h = q.shape
  kv = k.shape[1]
  fused = {"kernel": np.concatenate([q.reshape(d, kv, n // kv, h), k[:, :, None],
                                     v[:, :, None]], axis=2)}
  if "bias" in attn["q_proj"]:
    qb, kb, vb = (np.asarray(attn[f"{x}_proj"]["bias"]) for x in "qkv")
    fused["bias"] = np.concatenate([qb.reshape(kv, n // kv, h), kb[:, None], vb[:, None]], 1)
  rest = {key: val for key, val in attn.items() if key not in ("q_proj", "k_proj", "v_proj")}
  return dict(rest, qkv_proj=fused)


__all__ = ["FORMAT_VERSION", "upgrade_params"]
