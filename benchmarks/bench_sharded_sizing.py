"""Sizing sharded decoding by simulation: per-device bytes and per-step collectives, no weights.

  python benchmarks/bench_sharded_sizing.py --out benchmarks/sharded_sizing.md
  python benchmarks/bench_sharded_sizing.py --models llama3_8b --batches 1   # a quick look
  python benchmarks/bench_sharded_sizing.py --load-check                     # peak host memory

For each base model (Vicuna-7B/13B/33B, Llama-3-8B/70B) with Hydra++ heads (the recipe: 4
heads x 4 blocks, own LM heads, the prefix layer), each mesh of 8 devices (v5e-8: 16 GiB
chips, 8 x H100: 80 GB) or 4 devices (v5p-8: 4 chips of 95 GB), batch 1 and 8, a 2048-slot
cache and bf16:

  params / heads / KV cache   bytes one device holds, from `jax.eval_shape` and the decode
                              shardings (the base cache and the prefix layer's);
  loop peak                   the speculative loop's compiled memory analysis (arguments +
                              temporaries + outputs not aliased to the donated state), from
                              `.lower(ShapeDtypeStructs with shardings).compile()` on fake CPU
                              devices: nothing is allocated;
  collectives / step          bytes per device the loop body's collectives produce each step
                              (`decoding.collectives`; the sampling branch excluded).

Meshes are simulated on fake CPU devices; XLA:CPU's temporaries are an estimate of an
accelerator's (its fusion and layout differ), params / heads / cache are exact.

--load-check writes a random checkpoint (about 0.9 GB in f32) and measures the peak resident
memory of loading it: whole into one process, versus straight into shards by two processes
x 4 CPU devices (jax.distributed over 127.0.0.1), each of which reads only its slices.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--load-worker" not in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 1024 ** 3
# name: (devices, memory per device in bytes)
TARGETS = {"v5e-8": (8, 16 * GIB), "8xH100": (8, 80 * 10 ** 9), "v5p-8": (4, 95 * 10 ** 9)}
CACHE_LEN = 2048
PROMPT_LEN = 128


def base_models():
  from hydra_jax.model.config import ModelConfig
  from hydra_jax.training.config_base import BASE_MODELS
  models = dict(BASE_MODELS)
  # meta-llama/Meta-Llama-3-70B-Instruct (config.json): 70.6B parameters, 8 kv heads.
  models["llama3_70b"] = ModelConfig(
      vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
      num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
      max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=(128001, 128009))
  return models


def meshes(num_devices: int, batch: int):
  """(data, tensor) splits of the devices; batch 1 only without data parallelism."""
  out = []
  for data in (1, 2, 4, 8):
    if num_devices % data == 0 and (data == 1 or batch >= data):
      out.append((data, num_devices // data))
  return out


def size_one(cfg, data: int, tensor: int, batch: int, tree):
  """Per-device bytes and per-step collectives of the Hydra++ loop on one mesh."""
  import jax
  import jax.numpy as jnp
  from hydra_jax.decoding import collectives
  from hydra_jax.parallel import mesh as decode_mesh
  from hydra_jax.decoding.engine import DecodeEngine
  from hydra_jax.model.heads import HeadsConfig, param_shapes
  heads_cfg = HeadsConfig.for_base(cfg, "hydra++", num_heads=4, num_layers=4, dropout=0.2)
  mesh = decode_mesh.make_decode_mesh(f"data={data},tensor={tensor}",
                                      devices=jax.devices()[:data * tensor])
  engine = DecodeEngine(cfg, jnp.bfloat16, heads_cfg, tree, mesh=mesh)
  heads_shape = param_shapes(heads_cfg, cfg, jnp.bfloat16)
  args = engine.abstract_args(batch, PROMPT_LEN, heads_shape)
  t0 = time.perf_counter()
  prefill, loop = engine.lower(args, CACHE_LEN)
  compiled = loop.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  _, _, state_shape = engine._jitted(args, CACHE_LEN)
  state_sh = decode_mesh.state_shardings(state_shape, mesh)
  cache = decode_mesh.per_device_bytes((state_shape.cache, state_shape.spec.prefix_cache),
                                       (state_sh.cache, state_sh.spec.prefix_cache))
  found = collectives.loop_collectives(compiled)
  return dict(
      params=decode_mesh.per_device_bytes(args[0], engine.param_shardings),
      heads=decode_mesh.per_device_bytes(heads_shape, engine.heads_shardings),
      cache=cache,
      peak=(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes),
      temp=mem.temp_size_in_bytes,
      step_bytes=collectives.step_bytes(found),
      step_count=sum(1 for c in found if c.where in ("body", "condition")),
      compile_s=compile_s, collectives=found)


def _gib(n: int) -> str:
  return f"{n / GIB:.2f}"


def sizing(models, batches, targets, log=print):
  import warnings
  from hydra_jax.decoding.tree import resolve_tree
  tree = resolve_tree("mc_sim_7b_63", None, num_heads=4, max_topk=10 ** 9)
  models_table = base_models()
  rows, done = [], {}
  for name in models:
    cfg = models_table[name]
    for batch in batches:
      for target in targets:
        devices, capacity = TARGETS[target]
        for data, tensor in meshes(devices, batch):
          key = (name, data, tensor, batch)
          if key not in done:
            with warnings.catch_warnings():
              warnings.simplefilter("ignore")  # replicated kv heads show in the bytes
              done[key] = size_one(cfg, data, tensor, batch, tree)
            r = done[key]
            log(f"{name} data={data},tensor={tensor} batch {batch}: params {_gib(r['params'])} "
                f"heads {_gib(r['heads'])} cache {_gib(r['cache'])} peak {_gib(r['peak'])} GiB, "
                f"{r['step_bytes'] / 2 ** 20:.1f} MiB/step in {r['step_count']} collectives "
                f"(compiled in {r['compile_s']:.0f}s)")
          r = done[key]
          rows.append((target, name, f"data={data},tensor={tensor}", batch, r,
                       "yes" if r["peak"] <= capacity else "no"))
  lines = [
      "Hydra++ heads (4 x 4 blocks, own LM heads, prefix layer), tree mc_sim_7b_63 (64 nodes), "
      f"cache {CACHE_LEN} slots, bf16. Per device, GiB. 'peak' is the compiled decode loop's "
      "memory analysis (arguments + temporaries + non-aliased outputs) on fake CPU devices; "
      "'MiB/step' the bytes per device its collectives produce each step (the sampling branch "
      "excluded).", "",
      "Command: `python benchmarks/bench_sharded_sizing.py --out benchmarks/sharded_sizing.md`",
      "",
      "| target | model | mesh | batch | params | heads | KV cache | loop peak | fits | "
      "collectives / step | MiB / step |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for target, name, mesh, batch, r, fits in rows:
    lines.append(f"| {target} | {name} | {mesh} | {batch} | {_gib(r['params'])} | "
                 f"{_gib(r['heads'])} | {_gib(r['cache'])} | {_gib(r['peak'])} | {fits} | "
                 f"{r['step_count']} | {r['step_bytes'] / 2 ** 20:.2f} |")
  text = "\n".join(lines) + "\n"
  return text, done


def collectives_report(name: str, data: int = 1, tensor: int = 4, batch: int = 1) -> str:
  """Markdown tables of what one AR step and one Hydra++ step communicate."""
  import warnings
  import jax
  import jax.numpy as jnp
  from hydra_jax.decoding import collectives
  from hydra_jax.parallel import mesh as decode_mesh
  from hydra_jax.decoding.engine import DecodeEngine
  from hydra_jax.decoding.tree import resolve_tree
  cfg = base_models()[name]
  mesh_text = f"data={data},tensor={tensor}"
  out = [f"{name}, mesh {mesh_text}, batch {batch}, cache {CACHE_LEN}, bf16. Bytes are per "
         "device, of each collective's result. 'body' runs every step, 'condition' every loop "
         "test; 'branch' sits in a lax.cond (the greedy / sampling branches of the token choice: "
         "one of them runs each step).", "",
         f"Command: `python benchmarks/bench_sharded_sizing.py --collectives {name}`", ""]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    mesh = decode_mesh.make_decode_mesh(mesh_text, devices=jax.devices()[:data * tensor])
    ar = DecodeEngine(cfg, jnp.bfloat16, mesh=mesh)
    found = collectives.loop_collectives(
        ar.lower(ar.abstract_args(batch, PROMPT_LEN), CACHE_LEN)[1].compile())
  out += [f"Autoregressive: {collectives.step_bytes(found):,} bytes per step (every step), "
          f"{collectives.step_bytes(found, branches=True):,} with both branches", "",
          collectives.markdown_table(found), ""]
  r = size_one(cfg, data, tensor, batch, resolve_tree("mc_sim_7b_63", None, num_heads=4,
                                                       max_topk=10 ** 9))
  found = r["collectives"]
  out += [f"Hydra++ (mc_sim_7b_63, 64 nodes): {collectives.step_bytes(found):,} bytes per step "
          f"(every step), {collectives.step_bytes(found, branches=True):,} with branches", "",
          collectives.markdown_table(found), ""]
  return "\n".join(out)


# --- peak host memory of loading -----------------------------------------------------------------


def _rss_peak_bytes() -> int:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_worker(argv):
  """One process of --load-check: load, report peak RSS (and the baseline before loading)."""
  mode, model_dir, process_id, num_processes, port = argv[:5]
  import jax
  process_id, num_processes = int(process_id), int(num_processes)
  if mode == "sharded":
    jax.config.update("jax_num_cpu_devices", 8 // num_processes)
    if num_processes > 1:
      jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                 num_processes=num_processes, process_id=process_id)
  jax.numpy.zeros(1).block_until_ready()
  from hydra_jax.decoding.api import load_model
  baseline = _rss_peak_bytes()
  t0 = time.perf_counter()
  model = load_model(model_dir, tokenizer=False,
                     mesh="data=1,tensor=8" if mode == "sharded" else None)
  jax.block_until_ready(model.params)
  print(f"RESULT {mode} {process_id} {baseline} {_rss_peak_bytes()} "
        f"{time.perf_counter() - t0:.2f}", flush=True)
  if mode == "sharded" and num_processes > 1:
    jax.distributed.shutdown()


def load_check(log=print) -> str:
  import socket
  import subprocess
  import tempfile
  from hydra_jax.tools.testing import make_hf_model
  model_dir = os.path.join(tempfile.gettempdir(), "hydra_jax_load_check")
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    log("writing a random ~0.9 GB checkpoint to " + model_dir)
    make_hf_model(model_dir, "llama", vocab_size=32000, hidden_size=1024,
                  intermediate_size=4096, num_layers=12, num_heads=16, num_kv_heads=8,
                  tokenizer=False)
  size = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  me = os.path.abspath(__file__)

  def run(mode, num_processes):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, me, "--load-worker", mode, model_dir, str(i),
                               str(num_processes), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    results = []
    for p, o in zip(procs, outs):
      line = [x for x in o.splitlines() if x.startswith("RESULT")]
      if p.returncode or not line:
        raise RuntimeError(f"load worker failed:\n{o[-3000:]}")
      _, _, pid, base, peak, secs = line[0].split()
      results.append((int(pid), int(base), int(peak), float(secs)))
    return results

  lines = [f"Peak resident host memory of loading a {size / 2 ** 20:.0f} MiB f32 checkpoint "
           "(12 layers, d=1024, vocab 32000), per process; 'added' is the peak minus the "
           "process's resident memory before loading (jax initialised).", "",
           "Command: `python benchmarks/bench_sharded_sizing.py --load-check`", "",
           "| load | processes x CPU devices | process | added peak MiB | x checkpoint | s |",
           "|---|---|---|---|---|---|"]
  for mode, n, label in (("whole", 1, "1 x 1, whole (load_model)"),
                         ("sharded", 2, "2 x 4, sharded data=1,tensor=8")):
    for pid, base, peak, secs in run(mode, n):
      added = peak - base
      lines.append(f"| {mode} | {label} | {pid} | {added / 2 ** 20:.0f} | {added / size:.2f} | "
                   f"{secs:.1f} |")
      log(lines[-1])
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  if argv is None and "--load-worker" in sys.argv:
    _load_worker(sys.argv[sys.argv.index("--load-worker") + 1:])
    return 0
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="*", default=["vicuna_7b", "vicuna_13b", "vicuna_33b",
                                                  "llama3_8b", "llama3_70b"])
  ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
  ap.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
  ap.add_argument("--out", default=None, help="write the markdown tables here")
  ap.add_argument("--load-check", action="store_true",
                  help="measure the peak host memory of whole vs sharded loading instead")
  ap.add_argument("--collectives", metavar="MODEL", default=None,
                  help="instead: the per-step collectives of the AR and Hydra++ loops of MODEL "
                       "on data=1,tensor=4, batch 1")
  ap.add_argument("--append", action="store_true", help="append to --out instead of replacing")
  args = ap.parse_args(argv)
  log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
  if args.collectives:
    text = collectives_report(args.collectives)
    header = "\n## Collectives per decode step\n\n"
  elif args.load_check:
    text = load_check(log)
    header = "\n## Peak host memory of loading\n\n"
  else:
    text, _ = sizing(args.models, args.batches, args.targets, log)
    header = "# Sharded decoding: sizing by simulation\n\n"
  print(text)
  if args.out:
    with open(args.out, "a" if args.append else "w") as f:
      f.write(header + text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
