"""Run the model over a batch of token ids and collect what the measures need."""

from __future__ import annotations

import torch

from etl.lens.types import AblationMeans, BatchActivations
from etl.model.loading import has_parallel_blocks


def hook_names(n_layers: int, parallel: bool = False, attention: bool = False) -> list[str]:
    """Hook points cached for the measures, in the bridge's canonical names; ``parallel``
    blocks (attention and MLP both read ``resid_pre``) have no ``hook_resid_mid``;
    ``attention`` adds each layer's attention pattern and values (CSPA reads them)."""
    names = ["ln_final.hook_scale", f"blocks.{n_layers - 1}.hook_resid_post"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z",
                  f"blocks.{layer}.hook_mlp_out"]
        if not parallel:
            names.append(f"blocks.{layer}.hook_resid_mid")
        if attention:
            names += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
    return names


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, ...]`` → ``[batch·pos, ...]``."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


@torch.inference_mode()
def run_batch(bridge, tokens: torch.Tensor, attention: bool = False,
              bos: bool = False) -> BatchActivations:
    """Forward ``tokens`` ``[batch, pos]`` and gather activations flattened to tokens
    (``attention``: the attention patterns and values too, for CSPA: ``batch·L·H·pos²``
    more numbers; ``attention`` or ``bos``: each head's attention to position 0, BOS,
    ``batch·L·H·pos`` more numbers, sliced from the pattern as the forward pass makes it).

    Returns:
        ``BatchActivations`` with ``T = batch·pos`` tokens in row-major order (sequence,
        then position), in the model's dtype and on its device.
    """
    n_layers = bridge.cfg.n_layers
    parallel = has_parallel_blocks(bridge.cfg)
    to_bos: dict[int, torch.Tensor] = {}
    hooks = _bos_hooks(n_layers, to_bos) if bos and not attention else []
    with bridge.hooks(fwd_hooks=hooks):
        logits, cache = bridge.run_with_cache(
            tokens, names_filter=hook_names(n_layers, parallel, attention))
    z = torch.stack([cache[f"blocks.{i}.attn.hook_z"] for i in range(n_layers)], dim=2)
    if z.dim() != 5:
        raise RuntimeError(f"expected hook_z as [batch, pos, heads, d_head], got {z.shape[2:]}")
    positions = torch.arange(tokens.shape[1], device=logits.device).repeat(tokens.shape[0])

    def stacked(hook: str) -> torch.Tensor:  # [T, L, ...]
        return _flat(torch.stack([cache[f"blocks.{i}.{hook}"] for i in range(n_layers)], dim=2))

    resid_pre = stacked("hook_resid_pre")
    extra = _attention(cache, n_layers, z.shape[3]) if attention else {}
    if attention:
        to_bos = {i: cache[f"blocks.{i}.attn.hook_pattern"][..., 0] for i in range(n_layers)}
    return BatchActivations(
        resid_pre=resid_pre,
        resid_mid=resid_pre if parallel else stacked("hook_resid_mid"),
        z=_flat(z),
        mlp_out=stacked("hook_mlp_out"),
        resid_final=_flat(cache[f"blocks.{n_layers - 1}.hook_resid_post"]),
        final_scale=_flat(cache["ln_final.hook_scale"]),
        logits=_flat(logits),
        positions=positions,
        bos_attention=_to_bos(to_bos, n_layers, z.shape[3]) if to_bos else None,
        **extra,
    )


def _bos_hooks(n_layers: int, store: dict[int, torch.Tensor]) -> list:
    """Forward hooks that keep column 0 of each layer's attention pattern ``[B, H, P, P]``
    (destination, then source; one head per query head under grouped-query attention) in
    ``store[layer]`` as ``[B, H, P]``, leaving the pattern itself to be freed."""
    def keep(layer: int):
        def hook(pattern: torch.Tensor, hook) -> torch.Tensor:
            store[layer] = pattern[..., 0].clone()
            return pattern
        return hook

    return [(f"blocks.{i}.attn.hook_pattern", keep(i)) for i in range(n_layers)]


def _to_bos(store: dict[int, torch.Tensor], n_layers: int, n_heads: int) -> torch.Tensor:
    """``[T, L, H]`` attention to position 0 from the layers' ``[B, H, P]`` columns."""
    columns = [store[i] for i in range(n_layers)]
    if any(c.dim() != 3 or c.shape[1] != n_heads for c in columns):
        raise RuntimeError(f"expected hook_pattern as [batch, {n_heads} heads, pos, pos], got "
                           f"{[tuple(c.shape) for c in columns]}")
    return _flat(torch.stack(columns, dim=2).transpose(1, 3))  # [B, H, L, P] → [B, P, L, H]


def _attention(cache, n_layers: int, n_heads: int) -> dict[str, torch.Tensor]:
    """``pattern [B, L, H, P, P]`` and ``v [T, L, H, dh]`` (grouped key/value heads repeated
    for their query heads) of a cache."""
    pattern = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layers)],
                          dim=1)
    values = []
    for i in range(n_layers):
        v = cache[f"blocks.{i}.attn.hook_v"]
        values.append(v.repeat_interleave(n_heads // v.shape[2], dim=2))
    return {"pattern": pattern, "v": _flat(torch.stack(values, dim=2))}


class MeanAccumulator:
    """Per-position running sums of component outputs, for mean ablation (float64)."""

    def __init__(self) -> None:
        self.z_sum: torch.Tensor | None = None
        self.mlp_sum: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    @torch.inference_mode()
    def add(self, bridge, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch ``tokens [batch, pos]``; ``mask [batch, pos]`` selects real tokens."""
        n_layers = bridge.cfg.n_layers
        names = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
        names += [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
        _, cache = bridge.run_with_cache(tokens, names_filter=names)
        weight = mask.to(device=tokens.device, dtype=torch.float64)
        z = torch.stack([cache[n] for n in names[:n_layers]], dim=2).double()
        mlp = torch.stack([cache[n] for n in names[n_layers:]], dim=2).double()
        batch = MeanAccumulator()
        batch.z_sum = torch.einsum("bp,bplhk->plhk", weight, z)
        batch.mlp_sum = torch.einsum("bp,bpld->pld", weight, mlp)
        batch.count = weight.sum(0)
        self.merge(batch)

    def add_sequences(self, bridge, tokens, start: int, stop: int, device: str) -> None:
        """Add sequences ``start:stop`` of ``tokens`` (an ``etl.sources.corpus.TokenSet``),
        their padding masked out, run on ``device``."""
        ids = torch.from_numpy(tokens.token_ids[start:stop]).to(device)
        mask = torch.from_numpy(~tokens.is_pad[start:stop]).to(device)
        self.add(bridge, ids, mask)

    def merge(self, other: MeanAccumulator) -> None:
        """Add the sums of ``other`` (over other sequences of the same run) to these."""
        if other.z_sum is None:
            return
        if self.z_sum is None:
            self.z_sum, self.mlp_sum, self.count = other.z_sum, other.mlp_sum, other.count
            return
        self.z_sum += other.z_sum.to(self.z_sum.device)
        self.mlp_sum += other.mlp_sum.to(self.mlp_sum.device)
        self.count += other.count.to(self.count.device)

    def to(self, device: str | torch.device) -> MeanAccumulator:
        """These sums on ``device`` (to send them between processes)."""
        moved = MeanAccumulator()
        if self.z_sum is not None:
            moved.z_sum, moved.mlp_sum, moved.count = (
                t.to(device) for t in (self.z_sum, self.mlp_sum, self.count))
        return moved

    def means(self, dtype: torch.dtype) -> AblationMeans:
        """Per-position means ``[P, ...]`` (zero where a position has no real token)."""
        if self.z_sum is None:
            raise ValueError("no batch was added")
        denom = self.count.clamp(min=1.0)
        return AblationMeans(z=(self.z_sum / denom[:, None, None, None]).to(dtype),
                             mlp_out=(self.mlp_sum / denom[:, None, None]).to(dtype))
