"""Tiled MLP over the sequence: the MLP of a decoder layer run ``tile`` tokens at a time, so that its
intermediates (``L x intermediate_size``: gate, up, their product and their gradients) exist for one tile at
once, in the checkpoint recompute and in the backward alike. Two implementations, measured side by side:

- ``deepspeed``: ``deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP`` (ALST): the forward runs the tiles
  under ``no_grad``, the backward recomputes each tile and backpropagates it into a slice of the input gradient;
- ``ours``: each tile under non-reentrant activation checkpointing, then one ``cat``: the same recompute-per-tile,
  in plain PyTorch (works with any optimizer, ZeRO or not, and nests in the layer's own checkpoint).

Both give the MLP's exact outputs and gradients (the same operations per token).
"""

from __future__ import annotations

import math
import types


def _plain_mlp(mlp, x):
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _ours(mlp, x, tile: int):
    from torch import cat
    from torch.utils.checkpoint import checkpoint

    if x.shape[-2] <= tile:
        return _plain_mlp(mlp, x)
    tiles = x.split(tile, dim=-2)
    return cat([checkpoint(_plain_mlp, mlp, t, use_reentrant=False) for t in tiles], dim=-2)


def _deepspeed(mlp, x, tile: int):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = math.ceil(x.shape[-2] / tile)
    if shards <= 1:
        return _plain_mlp(mlp, x)
    params = [p for p in mlp.parameters() if p.requires_grad]
    return TiledMLP.apply(_plain_mlp, mlp, x, shards, params)


def tile_mlps(model, kind: str, tile: int) -> int:
    """Replace the forward of every module named ``*.mlp`` with a tiled one; returns how many were tiled."""
    impl = {"ours": _ours, "deepspeed": _deepspeed}[kind]
    count = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(lambda self, x, _impl=impl: _impl(self, x, tile), module)
            count += 1
    if not count:
        raise ValueError("no gate/up/down MLP found to tile")
    return count
