"""Turn a filter-pruned model into a physically smaller plain Flax model with fewer channels.

A filter mask zeroes whole output filters, but the masked model still computes them: same
shapes, same FLOPs, same speed. :func:`compact` removes them. It describes the model family as
a small graph of ops (:mod:`dcil_jax.compact_model` runs that graph; that file needs no
``dcil_jax``), finds which channels can go, slices every conv, BatchNorm and dense layer, and
folds the constants the removed channels still carried.

Which channels can go. A pruned filter's conv output is zero, so after BatchNorm (eval mode) and
ReLU its channel is a per-channel constant ``c``, not zero. Channels that elementwise ops
(BatchNorm, ReLU, residual additions, pooling) connect form one *channel space*; a channel of a
space is removed when it is constant in every tensor of the space, i.e. when every conv writing
into the space pruned that filter. Inside a block (the first conv of a basic block, the first
two of a bottleneck, every conv of VGG and the small CNN) a conv is its space's only writer, so
every pruned filter goes. A channel of a residual stream is written by the stem or shortcut conv
and by the last conv of every block of its stage: it goes only if all of them pruned it; the
report lists the others and which writers keep them.

Folding. A removed channel with constant ``c`` feeds each consumer ``c * W[..., k, :]``: for the
dense head (after global pooling or flattening) and a 1x1 conv that is a constant vector, folded
into the following BatchNorm's running mean (or a conv bias when an addition follows); for a
padded 3x3 conv the contribution is smaller at the border (taps on the zero padding), so it is
kept exact as a ``[kh, kw, 1, out]`` kernel run over an all-ones image
(:class:`dcil_jax.compact_model.CompactConv`). So the compact model's eval-mode logits equal the
masked model's up to float32 rounding, for any input size.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dcil_jax import compact_model
from dcil_jax.models.resnet_cifar import BasicBlock, Bottleneck, ResNetCifar
from dcil_jax.models.resnet_imagenet import ResNet
from dcil_jax.models.small_cnn import SmallCNN
from dcil_jax.models.vgg import VGG
from dcil_jax.models.wrn import WideResNet

BN_EPSILON = 1e-5  # every model in dcil_jax.models uses PyTorch's default
Path_ = tuple[str, ...]


@dataclasses.dataclass
class Compacted:
  """A compact model: ``module.apply(variables, x)`` runs it; ``report`` says what was removed.

  Attributes:
    module: a :class:`dcil_jax.compact_model.CompactNet`.
    variables: ``{"params": ..., "batch_stats": ...}`` for ``module``.
    arch: the architecture (JSON-serialisable; ``module.arch`` is its JSON).
    report: ``{"family", "filters", "pruned", "removed", "layers": [...]}``; each layer entry
      has the conv's ``name``, ``filters``, ``pruned``, ``removed``, ``kept`` and ``not_removed``:
      a list of ``{"channels": [...], "reason": ...}`` for pruned filters that stayed.
  """

  module: compact_model.CompactNet
  variables: dict[str, Any]
  arch: dict[str, Any]
  report: dict[str, Any]


class _Graph:
  """Records the ops of one model family, checking each referenced layer exists."""

  def __init__(self, params: Any, family: str):
    self.params, self.family, self.ops, self.count = params, family, [], 0

  def layer(self, path: Path_) -> Any:
    node = self.params
    for key in path:
      if not hasattr(node, "keys") or key not in node:
        raise ValueError(
          f"The variables do not match the {self.family} layout: no layer "
          f"{'/'.join(path)}. Pass the model the variables were created with."
        )
      node = node[key]
    return node

  def _add(self, **op: Any) -> str:
    self.count += 1
    op["dst"] = f"t{self.count}"
    self.ops.append(op)
    return op["dst"]

  def conv(self, src: str, path: Path_, strides: int = 1, padding: int | str = "SAME") -> str:
    kernel = self.layer(path)["kernel"]
    pad = padding if isinstance(padding, str) else [[padding, padding]] * 2
    return self._add(
      op="conv",
      src=src,
      path=path,
      kernel=list(kernel.shape[:2]),
      strides=[strides, strides],
      padding=pad,
    )

  def bn(self, src: str, path: Path_) -> str:
    self.layer(path)
    return self._add(op="bn", src=src, path=path, epsilon=BN_EPSILON)

  def relu(self, src: str) -> str:
    return self._add(op="relu", src=src)

  def add(self, a: str, b: str) -> str:
    return self._add(op="add", src=[a, b])

  def maxpool(self, src: str, window: int, strides: int, padding: int | str) -> str:
    pad = padding if isinstance(padding, str) else [[padding, padding]] * 2
    return self._add(
      op="maxpool", src=src, window=[window, window], strides=[strides, strides], padding=pad
    )

  def mean(self, src: str) -> str:
    return self._add(op="mean", src=src)

  def flatten(self, src: str) -> str:
    return self._add(op="flatten", src=src)

  def dense(self, src: str, path: Path_) -> str:
    self.layer(path)
    return self._add(op="dense", src=src, path=path)

  def blocks(self, prefix: str) -> int:
    n = 0
    while f"{prefix}_{n}" in self.params:
      n += 1
    return n


def _basic_block(g: _Graph, x: str, name: str, strides: int) -> str:
  p = lambda layer: (name, layer)
  y = g.relu(g.bn(g.conv(x, p("Conv_0"), strides, 1), p("BatchNorm_0")))
  y = g.bn(g.conv(y, p("Conv_1"), 1, 1), p("BatchNorm_1"))
  if "Conv_2" in g.layer((name,)):
    x = g.bn(g.conv(x, p("Conv_2"), strides), p("BatchNorm_2"))
  return g.relu(g.add(y, x))


def _bottleneck(g: _Graph, x: str, name: str, strides: int) -> str:
  p = lambda layer: (name, layer)
  y = g.relu(g.bn(g.conv(x, p("Conv_0")), p("BatchNorm_0")))
  y = g.relu(g.bn(g.conv(y, p("Conv_1"), strides, 1), p("BatchNorm_1")))
  y = g.bn(g.conv(y, p("Conv_2")), p("BatchNorm_2"))
  if "Conv_3" in g.layer((name,)):
    x = g.bn(g.conv(x, p("Conv_3"), strides), p("BatchNorm_3"))
  return g.relu(g.add(y, x))


def _resnet_stages(g: _Graph, model: Any, x: str) -> str:
  block = {BasicBlock: _basic_block, Bottleneck: _bottleneck}.get(model.block_cls)
  if block is None:
    raise ValueError(
      f"compact() knows the blocks BasicBlock and Bottleneck, not {model.block_cls.__name__!r} "
      f"of this {type(model).__name__}."
    )
  i = 0
  for stage, count in enumerate(model.stage_sizes):
    for b in range(count):
      x = block(g, x, f"{model.block_cls.__name__}_{i}", 2 if stage > 0 and b == 0 else 1)
      i += 1
  if g.blocks(model.block_cls.__name__) != i:
    raise ValueError(f"The variables do not match the {g.family} layout: expected {i} blocks.")
  return x


def _resnet_cifar(g: _Graph, model: ResNetCifar) -> str:
  x = g.relu(g.bn(g.conv("input", ("Conv_0",), 1, 1), ("BatchNorm_0",)))
  return g.dense(g.mean(_resnet_stages(g, model, x)), ("Dense_0",))


def _resnet_imagenet(g: _Graph, model: ResNet) -> str:
  x = g.relu(g.bn(g.conv("input", ("Conv_0",), 2, 3), ("BatchNorm_0",)))
  x = g.maxpool(x, 3, 2, 1)
  return g.dense(g.mean(_resnet_stages(g, model, x)), ("Dense_0",))


def _small_cnn(g: _Graph, model: SmallCNN) -> str:
  x = "input"
  for i in range(len(model.widths)):
    strides = 2 if i == len(model.widths) - 1 else 1
    x = g.relu(g.bn(g.conv(x, (f"Conv_{i}",), strides, 1), (f"BatchNorm_{i}",)))
  return g.dense(g.mean(x), ("Dense_0",))


def _vgg(g: _Graph, model: VGG) -> str:
  x, i = "input", 0
  for v in model.config:
    if v == "M":
      x = g.maxpool(x, 2, 2, "VALID")
    else:
      x = g.relu(g.bn(g.conv(x, (f"Conv_{i}",), 1, 1), (f"BatchNorm_{i}",)))
      i += 1
  return g.dense(g.flatten(x), ("Dense_0",))


def _wrn(g: _Graph, model: WideResNet) -> str:
  x = g.conv("input", ("Conv_0",), 1, 1)
  blocks = (model.depth - 4) // 6
  i = 0
  for stage in range(3):
    for b in range(blocks):
      name, strides = f"PreActBlock_{i}", 2 if stage > 0 and b == 0 else 1
      y = g.relu(g.bn(x, (name, "BatchNorm_0")))
      out = g.conv(y, (name, "Conv_0"), strides, 1)
      out = g.conv(g.relu(g.bn(out, (name, "BatchNorm_1"))), (name, "Conv_1"), 1, 1)
      if "Conv_2" in g.layer((name,)):
        x = g.conv(y, (name, "Conv_2"), strides)
      x = g.add(x, out)
      i += 1
  x = g.relu(g.bn(x, ("BatchNorm_0",)))
  return g.dense(g.mean(x), ("Dense_0",))


FAMILIES: dict[type, Callable[[_Graph, Any], str]] = {
  ResNetCifar: _resnet_cifar,
  ResNet: _resnet_imagenet,
  SmallCNN: _small_cnn,
  VGG: _vgg,
  WideResNet: _wrn,
}


def model_graph(model: nn.Module, params: Any) -> dict[str, Any]:
  """The op graph of ``model`` (``{"family", "ops", "output"}``), ops naming their layers.

  Raises:
    ValueError: for a model family :func:`compact` does not know (named), or params of
      another layout.
  """
  build = FAMILIES.get(type(model))  # exact type: a subclass may compute something else
  if build is None:
    raise ValueError(
      f"compact() does not know the model family {type(model).__name__!r}; it knows "
      f"{sorted(t.__name__ for t in FAMILIES)}. Nothing was written."
    )
  g = _Graph(params, type(model).__name__)
  out = build(g, model)
  return {"family": type(model).__name__, "ops": g.ops, "output": out}


class _Spaces:
  """Union-find over tensor names: tensors joined by elementwise ops share channels."""

  def __init__(self):
    self.parent: dict[str, str] = {}

  def find(self, t: str) -> str:
    self.parent.setdefault(t, t)
    while self.parent[t] != t:
      self.parent[t] = self.parent[self.parent[t]]
      t = self.parent[t]
    return t

  def union(self, a: str, b: str) -> None:
    self.parent[self.find(a)] = self.find(b)


def _get(tree: Any, path: Path_) -> Any:
  for key in path:
    if tree is None:
      return None
    tree = tree[key]
  return tree


def _name(path: Path_) -> str:
  return "__".join(path)


def compact(model: nn.Module, variables: dict[str, Any], masks: Any, align: int = 1) -> Compacted:
  """A physically smaller model whose eval-mode logits equal the filter-masked model's.

  Args:
    model: the plain model (a family of :mod:`dcil_jax.models`).
    variables: ``{"params": ..., "batch_stats": ...}`` of that model, e.g.
      :func:`dcil_jax.export_variables` (pruned filters zeroed or not: the mask decides).
    masks: filter masks over ``variables["params"]`` (``None`` at unpruned leaves), e.g. from
      :func:`dcil_jax.granularity.filter_masks`; each conv mask must be all-kept or all-pruned
      along every filter.
    align: keep some removable (pruned) channels so that every width is a multiple of
      ``align`` (or the full width): CPU and accelerator kernels often run faster on such widths
      than on fewer, odd ones. ``1`` removes all it can.

  Returns:
    A :class:`Compacted` (module, variables, architecture, report).

  Raises:
    ValueError: unknown family, variables of another layout, or masks that are not filter masks
      (the message names the layer).
  """
  if not isinstance(align, int) or align < 1:
    raise ValueError(f"align must be a positive integer, got {align!r}.")
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  graph = model_graph(model, params)
  ops = graph["ops"]

  conv_kernels = {(*op["path"], "kernel") for op in ops if op["op"] == "conv"}
  flat_masks, _ = jax.tree_util.tree_flatten_with_path(masks)
  for path, _ in flat_masks:
    names = tuple(str(getattr(k, "key", k)) for k in path)
    if names not in conv_kernels:
      raise ValueError(
        f"compact() removes conv filters only, but {'/'.join(names)} is masked: the compact "
        "model would not equal the masked one. Leave it unmasked (None)."
      )

  # Which filters every conv keeps, and its masked kernel.
  kernels, keep_out = {}, {}
  for op in ops:
    if op["op"] != "conv":
      continue
    kernel = np.asarray(_get(params, op["path"])["kernel"], np.float32)
    mask = _get(masks, (*op["path"], "kernel"))
    if mask is None:
      mask = np.ones(kernel.shape, bool)
    mask = np.asarray(mask, bool)
    if mask.shape != kernel.shape:
      raise ValueError(
        f"Mask of {'/'.join(op['path'])} has shape {mask.shape}, not {kernel.shape}."
      )
    flat = mask.reshape(-1, mask.shape[-1])
    if not (flat.all(axis=0) | ~flat.any(axis=0)).all():
      raise ValueError(
        f"The mask of {'/'.join(op['path'])} is not a filter mask (a filter is partly pruned); "
        "compact() removes whole filters only (dcil_jax.granularity.filter_masks)."
      )
    kernels[op["dst"]] = kernel * mask
    keep_out[op["dst"]] = flat.any(axis=0)

  # Per tensor: which channels are constant, and their value (eval mode); channel spaces.
  const: dict[str, np.ndarray] = {}
  value: dict[str, np.ndarray] = {}
  spaces = _Spaces()
  spaces.find("input")
  consumers: dict[str, list[dict]] = {}
  for op in ops:
    srcs = op["src"] if isinstance(op["src"], list) else [op["src"]]
    for s in srcs:
      consumers.setdefault(s, []).append(op)
    src, dst, kind = srcs[0], op["dst"], op["op"]
    if kind == "conv":
      const[dst] = ~keep_out[dst]
      value[dst] = np.zeros(const[dst].shape)
    elif kind == "bn":
      scale = np.asarray(_get(params, op["path"])["scale"], np.float64)
      bias = np.asarray(_get(params, op["path"])["bias"], np.float64)
      st = _get(stats, op["path"])
      mean, var = np.asarray(st["mean"], np.float64), np.asarray(st["var"], np.float64)
      const[dst] = const[src]
      value[dst] = (value[src] - mean) * scale / np.sqrt(var + op["epsilon"]) + bias
    elif kind == "relu":
      const[dst], value[dst] = const[src], np.maximum(value[src], 0.0)
    elif kind == "add":
      a, b = srcs
      const[dst], value[dst] = const[a] & const[b], value[a] + value[b]
    elif kind in ("maxpool", "mean", "flatten"):
      const[dst], value[dst] = const[src], value[src]
    if kind in ("bn", "relu", "add", "maxpool", "mean", "flatten"):
      for s in srcs:
        spaces.union(s, dst)

  members: dict[str, list[str]] = {}
  for t in [o["dst"] for o in ops if o["op"] != "dense"]:
    members.setdefault(spaces.find(t), []).append(t)
  removed: dict[str, np.ndarray] = {}
  extra_kept: dict[str, dict[int, str]] = {}  # removable channels kept anyway, and why
  for root, ts in members.items():
    if root == spaces.find("input"):
      removed[root] = np.zeros(const[ts[0]].shape, bool)
      continue
    r = np.logical_and.reduce([const[t] for t in ts])
    kept = int(r.size - r.sum())
    want = min(r.size, -(-max(kept, 1) // align) * align)  # never empty; a multiple of align
    if want > kept:
      extra = np.flatnonzero(r)[: want - kept]
      r = r.copy()
      r[extra] = False
      extra_kept[root] = {
        int(k): (
          "every channel of this layer is pruned; one is kept so the layer is not empty"
          if kept == 0 and i == 0
          else f"kept so that the width is a multiple of {align}"
        )
        for i, k in enumerate(extra)
      }
    removed[root] = r

  def removed_of(t: str) -> np.ndarray:
    if t == "input":
      return np.zeros(0, bool)
    return removed[spaces.find(t)]

  # Slice and fold.
  new_params: dict[str, Any] = {}
  new_stats: dict[str, Any] = {}
  mean_shift: dict[str, np.ndarray] = {}
  arch_ops = []
  writers: dict[str, list[dict]] = {}
  for op in ops:
    if op["op"] == "conv":
      writers.setdefault(spaces.find(op["dst"]), []).append(op)
  for op in ops:
    kind, src, dst = op["op"], op["src"], op["dst"]
    a = {k: v for k, v in op.items() if k != "path"}
    if kind == "conv":
      name = _name(op["path"])
      kernel = kernels[dst]
      out_keep = ~removed_of(dst)
      rem_in = removed_of(src) if src != "input" else np.zeros(kernel.shape[-2], bool)
      kernel = kernel[..., out_keep]
      src_value = value.get(src, np.zeros(rem_in.size))
      fold = np.einsum("hwio,i->hwo", kernel[:, :, rem_in, :], src_value[rem_in])
      new = {"kernel": kernel[:, :, ~rem_in, :].astype(np.float32)}
      if np.any(fold):
        pointwise = kernel.shape[:2] == (1, 1) and op["padding"] in ("SAME", [[0, 0]] * 2)
        next_ops = consumers.get(dst, [])
        if pointwise and len(next_ops) == 1 and next_ops[0]["op"] == "bn":
          mean_shift[next_ops[0]["dst"]] = fold[0, 0]
        elif pointwise:
          new["bias"] = fold[0, 0].astype(np.float32)
          a["bias"] = True
        else:
          new["border"] = fold[:, :, None, :].astype(np.float32)
          a["border"] = True
      new_params[name] = new
      a.update(name=name, features=int(out_keep.sum()))
    elif kind == "bn":
      name = _name(op["path"])
      keep = ~removed_of(dst)
      p, st = _get(params, op["path"]), _get(stats, op["path"])
      mean = np.asarray(st["mean"], np.float64)[keep] - mean_shift.get(dst, 0.0)
      new_params[name] = {k: np.asarray(p[k], np.float32)[keep] for k in ("scale", "bias")}
      new_stats[name] = {
        "mean": mean.astype(np.float32),
        "var": np.asarray(st["var"], np.float32)[keep],
      }
      a["name"] = name
    elif kind == "dense":
      name = _name(op["path"])
      p = _get(params, op["path"])
      kernel = np.asarray(p["kernel"], np.float64)
      rem = removed_of(src)
      rows = kernel.reshape(-1, rem.size, kernel.shape[-1])  # [positions, channels, out]
      bias = np.asarray(p["bias"], np.float64) + np.einsum(
        "pco,c->o", rows[:, rem], value[src][rem]
      )
      new_params[name] = {
        "kernel": rows[:, ~rem].reshape(-1, kernel.shape[-1]).astype(np.float32),
        "bias": bias.astype(np.float32),
      }
      a.update(name=name, features=int(kernel.shape[-1]))
    arch_ops.append(a)

  arch = {"family": graph["family"], "ops": arch_ops, "output": graph["output"]}
  report = _report(ops, keep_out, removed_of, spaces, writers, extra_kept, graph["family"])
  compact_vars = {"params": new_params}
  if new_stats:
    compact_vars["batch_stats"] = new_stats
  compact_vars = jax.tree.map(np.asarray, compact_vars)
  return Compacted(
    compact_model.CompactNet(json.dumps(arch)),
    compact_model.unflatten_variables(compact_model.flatten_variables(compact_vars)),
    arch,
    report,
  )


def _report(ops, keep_out, removed_of, spaces, writers, extra_kept, family) -> dict[str, Any]:
  layers = []
  for op in ops:
    if op["op"] != "conv":
      continue
    dst = op["dst"]
    pruned = ~keep_out[dst]
    rem = removed_of(dst)
    stayed = np.flatnonzero(pruned & ~rem)
    reasons: dict[str, list[int]] = {}
    root = spaces.find(dst)
    for k in stayed:
      others = ["/".join(w["path"]) for w in writers[root] if w is not op and keep_out[w["dst"]][k]]
      if others:
        reason = "residual stream channel: also written by " + ", ".join(others) + ", which keep it"
      else:
        reason = extra_kept.get(root, {}).get(int(k), "not removable")
      reasons.setdefault(reason, []).append(int(k))
    layers.append(
      {
        "name": "/".join(op["path"]),
        "filters": int(pruned.size),
        "pruned": int(pruned.sum()),
        "removed": int(rem.sum()),
        "kept": int((~rem).sum()),
        "not_removed": [{"channels": ch, "reason": r} for r, ch in reasons.items()],
      }
    )
  return {
    "family": family,
    "filters": sum(x["filters"] for x in layers),
    "pruned": sum(x["pruned"] for x in layers),
    "removed": sum(x["removed"] for x in layers),
    "layers": layers,
  }


def save_compact(compacted: Compacted, directory: str | Path) -> dict[str, int]:
  """Writes ``arch.json``, ``variables.npz``, ``report.json`` and the runtime ``compact_model.py``.

  The directory then runs without ``dcil_jax`` (see :mod:`dcil_jax.compact_model`). Everything
  is written to a temporary directory first and moved into place at the end, so a failure leaves
  nothing behind; an existing non-empty ``directory`` is refused.

  Returns:
    Bytes of each file written.
  """
  directory = Path(directory)
  if directory.exists() and any(directory.iterdir()):
    raise ValueError(f"{directory} exists and is not empty; nothing was written.")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=".compact-", dir=directory.parent))
  try:
    (tmp / "arch.json").write_text(json.dumps(compacted.arch, indent=1))
    (tmp / "report.json").write_text(json.dumps(compacted.report, indent=1))
    np.savez(tmp / "variables.npz", **compact_model.flatten_variables(compacted.variables))
    shutil.copyfile(compact_model.__file__, tmp / "compact_model.py")
    if directory.exists():
      directory.rmdir()
    tmp.rename(directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {p.name: p.stat().st_size for p in sorted(directory.iterdir())}
