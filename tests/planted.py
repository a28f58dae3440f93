"""Hand-built models with planted heads, made from the random tiny GPT-2 checkpoint, whose
copy-suppression shares are known by construction.

The text uses a small vocabulary ``WORDS``. Each of its tokens gets its own direction of a
subspace ``E`` of the residual stream (orthonormal, orthogonal to the all-ones vector, so
LayerNorm's centring leaves it alone) as embedding and, tied, as unembedding; every other
token's embedding, the position embeddings and every other head's and MLP's output are
projected out of ``E``. LayerNorm weights are 1 and biases 0. Then:

- head 0.0 **copies**: uniform attention over the prefix, OV circuit ``+β·P_E`` (gain
  ``copy`` instead of β when given; it raises the logits of the tokens in context, so the
  model predicts them);
- the **copy-suppression** model's head 1.0 attends the same way with OV ``−α·P_E``: it
  writes minus the unembedding directions of earlier tokens, so its direct effect lowers the
  logits of in-context tokens only (under the final-scale lens, exactly): both shares are 1;
- the **mixed** model's head 1.0 is the copy-suppression head on the first half of
  ``WORDS`` and a copying head (``+α``) on the other half: it lowers some in-context logits
  and raises others, so its suppression share lies between 0 and 1;
- the **antipodal** model: the words come in pairs ``(2j, 2j+1)`` whose embeddings and
  unembeddings are ``±γ·e_j`` (five directions), and head 1.0 is the copy-suppression head
  (``−α``); over text whose sequences come in mirrored pairs (each word swapped for its
  partner, ``mirrored``), its mean output is 0 at every position, so CSPA keeping every
  source keeps the whole of its output: its CSPA share is 1 (the copying head 0.0, whose
  outputs raise in-context logits, keeps nothing but the mean: 0);
- the **flattening** model: layer 0 adds ``+β·f`` to every residual (``f`` orthogonal to
  ``E``) and the tokens ``ABSENT`` (never in the text) have unembeddings along ``f``; head
  1.0 reads the ``f`` component and writes ``−α·f`` times it: it lowers the logits the model
  gives to tokens absent from the context, so both shares are 0. (A constant written
  through the value bias would not do: compatibility mode folds it into ``b_O``.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

WORDS = [" cat", " dog", " sun", " red", " blue", " tree", " car", " hat", " cup", " pen"]
ABSENT = [" moon", " star", " fish", " bird"]


def token_ids(tokenizer, words: list[str]) -> list[int]:
    """The single GPT-2 token of each word."""
    ids = [tokenizer.encode(w) for w in words]
    assert all(len(i) == 1 for i in ids), ids
    return [i[0] for i in ids]


def text(n_words: int = 600, seed: int = 0) -> str:
    """Words of ``WORDS`` drawn at random (with repeats), as one document."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (n_words,), generator=gen).tolist()
    return "".join(WORDS[i] for i in picks)


def mirrored(ids: list[int], words: list[int]) -> list[int]:
    """``ids`` with each word of ``words`` swapped for its partner (``2j`` ↔ ``2j+1``)."""
    partner = {w: words[i ^ 1] for i, w in enumerate(words)}
    return [partner.get(i, i) for i in ids]


def _basis(d: int, k: int, seed: int = 1) -> torch.Tensor:
    """``[d, k]`` orthonormal columns, orthogonal to the all-ones vector."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, k + 1, generator=gen, dtype=torch.float64)
    x[:, 0] = 1.0
    q, _ = torch.linalg.qr(x)
    return q[:, 1:]


@torch.no_grad()
def planted_checkpoint(source: Path, out: Path, kind: str, alpha: float = 6.0,
                       beta: float = 8.0, gamma: float = 12.0,
                       copy: float | None = None) -> Path:
    """A copy of the checkpoint ``source`` with the planted heads of ``kind``
    (``copy-suppression``, ``mixed``, ``antipodal`` or ``flattening``), saved to ``out``."""
    model = GPT2LMHeadModel.from_pretrained(source, torch_dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(source)
    cfg = model.config
    d, n_head = cfg.n_embd, cfg.n_head
    dh = d // n_head
    words, absent = token_ids(tokenizer, WORDS), token_ids(tokenizer, ABSENT)
    basis = _basis(d, len(words) + 1)
    e, f = basis[:, :len(words)], basis[:, len(words)]
    if kind == "antipodal":  # word 2j along +e_j, word 2j+1 along −e_j
        signs = torch.tensor([1.0, -1.0] * (len(words) // 2), dtype=torch.float64)
        e = basis[:, torch.arange(len(words)) // 2] * signs
    keep = torch.eye(d, dtype=torch.float64) - basis @ basis.T  # projects out E and f
    tr = model.transformer
    wte = tr.wte.weight
    wte.copy_(wte.double() @ keep)
    wte[words] = gamma * e.T
    if kind == "flattening":
        wte[absent] += gamma * f
    tr.wpe.weight.copy_(tr.wpe.weight.double() @ keep)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    for block in tr.h:
        block.attn.c_proj.weight.copy_(block.attn.c_proj.weight.double() @ keep)
        block.attn.c_proj.bias.copy_(block.attn.c_proj.bias.double() @ keep)
        block.mlp.c_proj.weight.copy_(block.mlp.c_proj.weight.double() @ keep)
        block.mlp.c_proj.bias.copy_(block.mlp.c_proj.bias.double() @ keep)
    _plant_head(tr.h[0].attn, 0, dh, e, +beta if copy is None else copy)
    if kind in ("copy-suppression", "antipodal"):
        _plant_head(tr.h[1].attn, 0, dh, e, -alpha)
    elif kind == "mixed":
        half = len(words) // 2
        _plant_head(tr.h[1].attn, 0, dh, e, torch.tensor(
            [-alpha] * half + [alpha] * (len(words) - half), dtype=torch.float64))
    elif kind == "flattening":
        tr.h[0].attn.c_proj.bias += beta * f
        attn = tr.h[1].attn
        _uniform_attention(attn, 0, dh)
        sl = slice(2 * d, 2 * d + dh)  # head 0's value: the f component layer 0 wrote
        attn.c_attn.weight[:, sl] = 0.0
        attn.c_attn.bias[sl] = 0.0
        attn.c_attn.weight[:, 2 * d] = f
        attn.c_proj.weight[0:dh] = 0.0
        attn.c_proj.weight[0] = -alpha * f
    else:
        raise ValueError(kind)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(source) / name, out / name)
    return out


def _uniform_attention(attn, head: int, dh: int) -> None:
    """Queries and keys of ``head`` zero: it attends uniformly to every earlier position."""
    d = attn.c_attn.weight.shape[0]
    for block in (0, d):  # the query and key blocks of c_attn
        sl = slice(block + head * dh, block + (head + 1) * dh)
        attn.c_attn.weight[:, sl] = 0.0
        attn.c_attn.bias[sl] = 0.0


def _plant_head(attn, head: int, dh: int, e: torch.Tensor,
                gain: float | torch.Tensor) -> None:
    """``head`` attends uniformly and its OV circuit is ``E diag(gain) Eᵀ`` (``gain``: one
    number, or one per column of ``E``)."""
    d, k = e.shape
    _uniform_attention(attn, head, dh)
    sl = slice(2 * d + head * dh, 2 * d + (head + 1) * dh)
    w_v = torch.zeros(d, dh, dtype=torch.float64)
    w_v[:, :k] = e
    attn.c_attn.weight[:, sl] = w_v
    attn.c_attn.bias[sl] = 0.0
    w_o = torch.zeros(dh, d, dtype=torch.float64)
    w_o[:k] = (gain[:, None] if isinstance(gain, torch.Tensor) else gain) * e.T
    attn.c_proj.weight[head * dh:(head + 1) * dh] = w_o
