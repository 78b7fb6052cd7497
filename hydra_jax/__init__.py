"""hydra_jax: Hydra speculative decoding (sequentially-dependent draft heads) in JAX/Flax.

    import hydra_jax
    model = hydra_jax.load_model("path/to/hf_dir")
    results = hydra_jax.generate(model, ["Hello"], max_new_tokens=32)

The top-level names are imported lazily, so `import hydra_jax` stays cheap.
"""

_LAZY = {
    "load_model": "hydra_jax.decoding.api",
    "generate": "hydra_jax.decoding.api",
    "GenerationResult": "hydra_jax.decoding.api",
    "DecodeInputError": "hydra_jax.decoding.api",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'hydra_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
