"""The package's import graph: no circle, and no arrow from a lower layer up to a higher one.

Every `import` counts, at module level or inside a function (a lazy import is still a
dependency). The reference is the layer order below, the one place it is written; README's
"Layout" lists the same folders in the same order.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hydra_jax")

# Lowest first. A module may import its own layer and the layers before it.
LAYERS = (
    "model",       # the Flax base model, KV cache, masks, draft heads
    "parallel",    # the one logical-axis rules table, meshes, shardings
    "checkpoint",  # reading and writing weights: HF, GGUF, our heads, released heads
    "registry",    # where ready models and shipped assets are (paths, fetch); not how made
    "decoding",    # the decode engine, trees, generate()
    "training",    # distillation of the heads, its data (self-distillation, Magpie)
    "recipes",     # how the shipped assets were made: pretraining, shipped heads' configs
    "tools",       # user-facing: bench, demo, test models
)


def _modules():
  """{dotted module name: file path} of every module in the package."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        found[".".join(rel)] = path
  return found


def _imports(name, path, modules):
  """The package modules `name` imports (a `from X import y` of a submodule counts as X.y)."""
  is_pkg = path.endswith("__init__.py")
  package = name if is_pkg else name.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in modules:  # `import hydra_jax.model.llama.X` -> the module itself
        t = t.rpartition(".")[0]
      if t and t != name and t != "hydra_jax":  # the facade's lazy names import nothing
        out.add(t)
  return out


def _layer(name):
  parts = name.split(".")
  if len(parts) < 2:
    return None  # the package facade (hydra_jax/__init__.py): above everything
  if parts[1] not in LAYERS:
    return None
  return LAYERS.index(parts[1])


@pytest.fixture(scope="module")
def graph():
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_lives_in_a_layer(graph):
  loose = sorted(n for n in graph if n != "hydra_jax" and _layer(n) is None)
  assert not loose, (f"modules outside the layers {LAYERS}: {loose}; move them into the folder "
                     "of what they are for, or add the layer to LAYERS")


def test_no_import_reaches_up_a_layer(graph):
  upward = sorted(f"{a} ({LAYERS[_layer(a)]}) -> {b} ({LAYERS[_layer(b)]})"
                  for a, deps in graph.items() for b in deps
                  if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a))
  assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(upward)


def test_no_import_circle(graph):
  # Tarjan's strongly connected components: any component of 2+ modules is a circle.
  index, low, stack, on_stack, circles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not circles, f"import circles: {circles}"


def test_the_checker_sees_a_circle_and_an_upward_arrow():
  """The graph walk itself: a planted upward import and a circle are both found."""
  fake = {"hydra_jax.model.a": {"hydra_jax.decoding.b"}, "hydra_jax.decoding.b": {"hydra_jax.model.a"}}
  up = [(a, b) for a, deps in fake.items() for b in deps if _layer(b) > _layer(a)]
  assert up == [("hydra_jax.model.a", "hydra_jax.decoding.b")]
  modules = _modules()
  llama = _imports("hydra_jax.model.llama", modules["hydra_jax.model.llama"], modules)
  assert "hydra_jax.model.config" in llama and "hydra_jax.model.kv_cache" in llama
