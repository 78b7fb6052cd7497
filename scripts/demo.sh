#!/usr/bin/env bash
# The main job from a fresh clone: creates .venv if missing, installs the package, and decodes
# a prompt with decode.py.
#
# It decodes with the embedded pretrained model (hydra_jax/assets/tiny_shakespeare) when the
# repository has it. Until then the demo builds a small RANDOM Llama
# (4 layers, width 128) with a BPE tokenizer trained on the spot, once, into a cache
# directory, using only the package itself (no torch, no download): our init_params, exported
# with export_hf as a Hugging Face directory that decode.py (or transformers) loads. Its text
# is gibberish; the point is the whole pipeline from checkpoint to tokens/s.
#
#   bash scripts/demo.sh                      # greedy, 64 new tokens
#   bash scripts/demo.sh --json --temperature 0.8 --top-p 0.9   # extra flags go to decode.py
#
# Environment: DEMO_MODEL (a Hugging Face model directory to decode with instead),
# DEMO_PROMPT, HYDRA_CACHE (default ~/.cache/hydra_jax) and those of scripts/_venv.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
ensure_venv
# transformers warns that torch is missing (the demo does not need it): keep stderr readable.
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"

cache="${HYDRA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hydra_jax}"
embedded="hydra_jax/assets/tiny_shakespeare"
if [[ -n "${DEMO_MODEL:-}" ]]; then
  model="$DEMO_MODEL"
elif [[ -f "$embedded/config.json" ]]; then
  model="$embedded"  # the pretrained model that ships with the package, once it exists
else
  model="$cache/demo-random-llama-v1"
  build_random=1
fi
prompt="${DEMO_PROMPT:-First Citizen: Before we proceed any further, hear me speak.}"

if [[ -n "${build_random:-}" && ! -f "$model/config.json" ]]; then
  echo "building a small random Llama + tokenizer in $model (once)" >&2
  mkdir -p "$(dirname "$model")"
  JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" "$VENV_PY" - "$model" <<'PY'
import os
import shutil
import sys
import tempfile

import jax

from hydra_jax.checkpoint.hf import export_hf
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.llama import init_params
from hydra_jax.testing import SIMPLE_CHAT_TEMPLATE, make_tokenizer

out = sys.argv[1]
tok = make_tokenizer(512, chat_template=SIMPLE_CHAT_TEMPLATE)
cfg = ModelConfig(
    vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=1024,
    bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
    pad_token_id=tok.pad_token_id)
params = init_params(cfg, jax.random.PRNGKey(0))
# Build beside the destination and rename, so an interrupted build never looks complete.
tmp = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(out))
try:
  export_hf(params, cfg, tmp, tokenizer=tok)
  if os.path.isdir(out):  # a leftover without config.json
    shutil.rmtree(out)
  os.replace(tmp, out)
  os.chmod(out, 0o755)  # mkdtemp makes it private
finally:
  shutil.rmtree(tmp, ignore_errors=True)
print(f"random Llama with {cfg.num_params:,} params, vocab {cfg.vocab_size} -> {out}",
      file=sys.stderr)
PY
fi

exec "$VENV_PY" decode.py --model "$model" --prompt "$prompt" --max-new-tokens 64 "$@"
