"""The collectives one decode step runs: read off the compiled (partitioned) HLO of a loop.

A sharded decode loop is one `lax.while_loop`; after SPMD partitioning, its body and its
condition hold every cross-device operation a step pays for. `loop_collectives` lists them
with their result shapes and bytes per device, so tests can assert that tensor parallelism
costs what it should (activation all-reduces, never an all-gather of a whole weight), and the
sizing benchmark can report the bytes a step moves.

Where each one sits matters: "body" and "condition" run every step; "branch" ones sit in a
`lax.cond` branch and run only on the steps that take it (e.g. the sampling branch of
`sampling.sample` at temperature > 0, whose sort over a vocab-sharded axis gathers logits);
"inner loop" ones run once per iteration of a nested while; "outside loop" ones run once per
call, before or after the loop. An all-gather of a weight hoisted out of the loop lands
there: it runs once, but leaves a whole copy of the weight on every device for the loop.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                  "collective-permute", "collective-broadcast", "ragged-all-to-all")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*"
                    r"(\((?:[^()]|\([^()]*\))*\)|\S+)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
                    r"branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str  # all-reduce, all-gather, ... (async -start/-done pairs count once, as the op)
  shape: str  # the result, as HLO prints it: f32[2,1,64]
  bytes: int  # of the result, per device
  group_size: int  # devices taking part in each group (0 when the HLO does not say)
  where: str  # "body" | "condition" | "branch" | "inner loop" | "outside loop"
  source: str = ""  # the jax op it came from (metadata op_name, without the jit/while prefix)


def array_bytes(shape_text: str) -> int:
  """Bytes of an HLO shape (arrays, or the sum over a tuple's arrays)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    n = 1
    for d in (x for x in dims.split(",") if x):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def _group_size(attrs: str) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: groups along the listed axes
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    n = 1
    for axis in re.findall(r"'([^']+)'", m.group(2)):
      n *= int(sizes.get(axis, 1))
    return n
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
  return 2 if m else 0


def _parse(hlo_text: str):
  """{computation: [(name, shape, opcode, rest of line)]} and the entry computation's name."""
  comps: Dict[str, List[Tuple[str, str, str, str]]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(")[0]:
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line) if current else None
    if m:
      comps[current].append(m.groups())
  return comps, entry


def _called(rest: str) -> List[Tuple[str, str]]:
  out = []
  for kind, target in _CALLS.findall(rest):
    names = re.findall(r"%?([\w.\-]+)", target.strip("{}"))
    out += [(kind, n) for n in names]
  return out


def _biggest_while(comps, entry) -> Optional[Tuple[str, str]]:
  """(body, condition) of the entry computation's while with the largest body."""
  best, best_size = None, -1
  for _, _, opcode, rest in comps.get(entry, []):
    if opcode != "while":
      continue
    calls = dict(_called(rest))
    body, cond = calls.get("body"), calls.get("condition")
    size = _reachable_size(comps, body)
    if size > best_size:
      best, best_size = (body, cond), size
  return best


def _reachable_size(comps, name, seen=None) -> int:
  seen = set() if seen is None else seen
  if name in seen or name not in comps:
    return 0
  seen.add(name)
  return len(comps[name]) + sum(_reachable_size(comps, n, seen)
                                for _, _, _, rest in comps[name] for _, n in _called(rest))


def collectives_in(hlo_text: str) -> List[Collective]:
  """The collectives of the decode loop in a compiled executable's HLO text (see module doc)."""
  comps, entry = _parse(hlo_text)
  loop = _biggest_while(comps, entry)
  if loop is None:
    raise ValueError("no while loop in the entry computation: pass a decode loop's executable")
  found: List[Collective] = []
  visited = set()

  def walk(name: str, where: str):
    if (name, where) in visited or name not in comps:
      return
    visited.add((name, where))
    for _, shape, opcode, rest in comps[name]:
      base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
      if base in COLLECTIVE_OPS:
        found.append(Collective(base, _result_shape(shape, opcode), _result_bytes(shape, opcode),
                                _group_size(rest), where, _source(rest)))
      for kind, callee in _called(rest):
        if kind == "to_apply" and base in COLLECTIVE_OPS:
          continue  # a reduction's combiner, not executed code
        if callee in loop:
          continue  # the decode loop itself, walked as body / condition
        if opcode == "conditional" or kind in ("true_computation", "false_computation",
                                               "branch_computations"):
          walk(callee, "branch" if where in ("body", "condition") else where)
        elif opcode == "while":
          walk(callee, "inner loop" if where != "outside loop" else where)
        else:
          walk(callee, where)

  body, cond = loop
  walk(body, "body")
  if cond:
    walk(cond, "condition")
  walk(entry, "outside loop")
  return found


def _source(attrs: str) -> str:
  m = re.search(r'op_name="([^"]*)"', attrs)
  if not m:
    return ""
  parts = [p for p in m.group(1).split("/") if not p.startswith(("jit(", "while", "body"))]
  return "/".join(parts)


def _result_shape(shape: str, opcode: str) -> str:
  # An async start returns (operand, result[, scratch]); the result is the second array.
  if opcode.endswith("-start") and shape.startswith("("):
    arrays = re.findall(r"[a-z]+\d*\[[\d,]*\]", shape)
    return arrays[1] if len(arrays) > 1 else arrays[0]
  return re.sub(r"\{[^}]*\}", "", shape)


def _result_bytes(shape: str, opcode: str) -> int:
  return array_bytes(_result_shape(shape, opcode))


def loop_collectives(compiled) -> List[Collective]:
  """`collectives_in` for a jax Compiled (jit(...).lower(...).compile())."""
  return collectives_in(compiled.as_text())


def step_bytes(collectives: Sequence[Collective], branches: bool = False) -> int:
  """Bytes per device that one step's collectives produce (every step: body + condition;
  with branches=True also the conditional ones)."""
  keep = ("body", "condition") + (("branch", "inner loop") if branches else ())
  return sum(c.bytes for c in collectives if c.where in keep)


def summarize(collectives: Sequence[Collective]):
  """[(where, op, shape, group size, count, bytes each, sources)], grouped, every-step ones
  first, then by bytes."""
  groups: Dict[Tuple[str, str, str, int], List[Collective]] = {}
  for c in collectives:
    groups.setdefault((c.where, c.op, c.shape, c.group_size), []).append(c)
  rows = []
  for (where, op, shape, group), cs in groups.items():
    sources = sorted({_short(c.source) for c in cs if c.source})
    rows.append((where, op, shape, group, len(cs), cs[0].bytes, ", ".join(sources[:3])))
  order = {"body": 0, "condition": 1, "inner loop": 2, "branch": 3, "outside loop": 4}
  return sorted(rows, key=lambda r: (order.get(r[0], 5), -r[4] * r[5]))


def _short(source: str) -> str:
  """The last two parts of an op name (module / op), enough to say where it came from."""
  parts = [p for p in source.split("/") if p]
  return "/".join(parts[-2:])


def markdown_table(collectives: Sequence[Collective]) -> str:
  lines = ["| where | collective | result (per device) | group | count | bytes each | bytes | from |",
           "|---|---|---|---|---|---|---|---|"]
  for where, op, shape, group, count, each, sources in summarize(collectives):
    lines.append(f"| {where} | {op} | {shape} | {group} | {count} | {each:,} | {count * each:,} "
                 f"| {sources} |")
  return "\n".join(lines)


__all__ = ["COLLECTIVE_OPS", "Collective", "array_bytes", "collectives_in", "loop_collectives",
           "markdown_table", "step_bytes", "summarize"]
