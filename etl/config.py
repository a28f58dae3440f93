"""Configuration of one extraction run."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from etl.errors import UserError
from etl.lens.modes import (
    ABLATION_MODES,
    CSPA_K,
    DEFAULT_MEASURES,
    LENS_MODES,
    canonical_lens,
    parse_cspa_k,
    parse_measures,
)
from etl.model.memory import CUDA_FORWARD_TOKENS, GPT2_SMALL, ModelSizes, forward_tokens
from etl.warehouse import DEFAULT_WAREHOUSE

DEFAULT_MODEL = "openai-community/gpt2"
"""``--model`` when none is given: GPT-2 small on the Hugging Face hub."""
DATASETS = ("openwebtext", "ioi", "text")
IOI_VARIANTS = ("clean", "abc", "both")
DTYPES = ("float32", "float64")
MAX_SEED = 2**32 - 1
"""Largest ``--seed`` (numpy's seeds are 32-bit)."""
MAX_RUN_TOKENS = 20_000_000
"""Largest run (in tokens) accepted without ``--allow-large``. For GPT-2 small a token gives
182 rows (12 layers × 13 components, 25 residual points, 1 token row): 3.6 billion rows,
about 15 GB of Parquet."""
MAX_WORKERS = 4096
"""The most ``--workers`` a run may ask for (a larger count is a typo, not a cluster)."""
PIPELINE_MODES = ("auto", "on", "off")
KERNELS = ("auto", "layer", "folded")
"""``--kernel`` choices (``etl.lens.kernel_config.named_config``)."""

DATASET_OPTIONS = {
    "n_prompts": ("--n-prompts", ("ioi",)),
    "ioi_variant": ("--ioi-variant", ("ioi",)),
    "data_files": ("--data-files", ("text",)),
    "n_batches": ("--n-batches", ("openwebtext", "text")),
    "seq_len": ("--seq-len", ("openwebtext", "text")),
}
"""Options that apply to some datasets only: attribute → (flag, datasets it applies to)."""


def option(help: str, **argparse_kwargs) -> dict:
    """Field metadata for ``add_arguments``: the flag's help (its default is appended) and
    any other ``add_argument`` keyword (``choices``, ``type``, ``metavar``, ``flag``)."""
    return {"help": help, **argparse_kwargs}


@dataclass
class ExtractConfig:
    """Everything that determines a run's numbers (recorded in its manifest). Each field is
    a ``python -m etl.extract`` flag (``--`` + its name with dashes); its metadata holds the
    flag's help."""

    model: str = field(default=DEFAULT_MODEL, metadata=option(
        "hub id or local Hugging Face checkpoint directory"))
    dataset: str = field(default="openwebtext", metadata=option(
        "openwebtext (stas/openwebtext-10k), ioi (generated prompts) or text (local files; "
        "needs --data-files)", choices=DATASETS))
    data_files: str | None = field(default=None, metadata=option(
        "local .txt/.md/.jsonl/.json/.parquet files for --dataset text", metavar="GLOB"))
    n_batches: int = field(default=4, metadata=option(
        "batches of text (openwebtext, text)"))
    batch_size: int = field(default=8, metadata=option(
        "sequences per batch of text (the run reads n_batches × batch_size sequences); on "
        "CPU also the sequences per forward pass"))
    seq_len: int = field(default=500, metadata=option(
        "tokens per text sequence, BOS included (openwebtext, text)"))
    n_prompts: int = field(default=100, metadata=option("IOI prompts (ioi)"))
    ioi_variant: str = field(default="clean", metadata=option(
        "IOI prompts: clean, the corrupted abc set, or both (ioi)", choices=IOI_VARIANTS))
    seed: int = field(default=420, metadata=option(
        "seed for document shuffling and the IOI generator"))
    lens: str = field(default=LENS_MODES[0], metadata=option(
        "final-scale: residuals divided by the final LayerNorm scale, no b_U (the lens of "
        "McDougall et al. 2023, Copy Suppression, arXiv:2310.04625); recomputed-ln: "
        "LayerNorm recomputed per residual, b_U included (the earlier names seed and "
        "recomputed still work)", choices=LENS_MODES, type=canonical_lens))
    ablation: str = field(default=ABLATION_MODES[0], metadata=option(
        "how the marginal removes a component: zero, or mean (its per-position mean over "
        "the run)", choices=ABLATION_MODES))
    measures: str = field(default=",".join(DEFAULT_MEASURES), metadata=option(
        "measure groups, comma-separated: entropy (always), loss, kl, context (the in-context "
        "part of each effect), suppression, calibration (top-3 probabilities), bos (each "
        "head's attention to BOS), cspa, default or all; the default is every group that "
        "costs at most 25 %% of the entropy stage on the CPU, which is all but cspa "
        "(BENCHMARKS.md); --measures entropy for the entropies alone",
        metavar="GROUPS"))
    dtype: str = field(default="float32", metadata=option(
        "model and compute dtype; half precision is refused (entropy diffs are tiny)",
        choices=DTYPES))
    chunk_tokens: int = field(default=0, metadata=option(
        "tokens per entropy chunk; bounds memory to a few [chunk, vocab] tensors (0 = auto: "
        "256 on CPU, 2048 on CUDA, fewer for vocabularies larger than GPT-2's)"))
    kernel: str = field(default="auto", metadata=option(
        "the fused kernel on CUDA: auto (the configuration measured fastest, BENCHMARKS.md), "
        "layer (a kernel per layer and a separate lens product) or folded (the next "
        "residual's lens folded into the layer kernel, tiles through tensor descriptors, a "
        "warp-specialised head loop); results agree within 1e-4 nats", choices=KERNELS))
    cspa_k: str = field(default=CSPA_K, metadata=option(
        "for --measures cspa: at each destination, keep the sources whose token is among the "
        "K most predicted there by the lens of the residual entering the head's layer; a "
        "fraction of the destination's position (ceil(K·(position+1)); 0.05, the Copy "
        "Suppression paper's headline setting) or a whole number of tokens", metavar="K"))
    forward_tokens: int = field(default=0, metadata=option(
        "tokens per forward pass, in whole sequences; results do not depend on it (0 = "
        f"auto: --batch-size sequences on CPU, {CUDA_FORWARD_TOKENS} tokens on CUDA, fewer "
        "for models whose logits and activations take more memory than GPT-2 small's)"))

    def __post_init__(self) -> None:
        self.lens = canonical_lens(self.lens)
        try:
            self.measures = ",".join(parse_measures(self.measures))
            parse_cspa_k(self.cspa_k)
        except ValueError as error:
            message = str(error)
            raise UserError(message if message.startswith("--") else f"--measures: {message}"
                            ) from None
        checks = [
            (self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}"),
            (self.lens in LENS_MODES, f"--lens must be one of {', '.join(LENS_MODES)}"),
            (self.ablation in ABLATION_MODES,
             f"--ablation must be one of {', '.join(ABLATION_MODES)}"),
            (self.ioi_variant in IOI_VARIANTS,
             f"--ioi-variant must be one of {', '.join(IOI_VARIANTS)}"),
            (self.dtype in DTYPES, "--dtype must be float32 or float64 (half precision "
                                   "cannot resolve entropy differences of 1e-3 nats)"),
            (bool(self.model), "--model is empty; pass a hub id or a checkpoint directory"),
            (self.dataset == "ioi" or self.seq_len >= 2,
             "--seq-len must be at least 2 (BOS plus one token)"),
            (self.seq_len >= 1, "--seq-len must be at least 1"),
            (self.n_batches >= 1, "--n-batches must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.n_prompts >= 1, "--n-prompts must be at least 1"),
            (self.chunk_tokens >= 0, "--chunk-tokens must be 0 (auto) or more"),
            (self.forward_tokens >= 0, "--forward-tokens must be 0 (auto) or more"),
            (self.kernel in KERNELS, f"--kernel must be one of {', '.join(KERNELS)}"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED:,}"),
            (self.dataset != "text" or bool(self.data_files),
             "--dataset text needs --data-files GLOB"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def needs_means(self) -> bool:
        """Whether the run needs the per-position means of a mean pass: mean ablation, or
        the CSPA measures (which mean-ablate whatever the ablation)."""
        return self.ablation == "mean" or "cspa" in self.measures.split(",")

    def resolved_chunk_tokens(self, device: str, d_vocab: int | None = None) -> int:
        """``chunk_tokens``, with 0 (auto) resolved for ``device`` and a vocabulary of
        ``d_vocab`` entries (``default_chunk_tokens``)."""
        from etl.lens.types import CHUNK_VOCAB, default_chunk_tokens  # torch: not at import

        return self.chunk_tokens or default_chunk_tokens(device, d_vocab or CHUNK_VOCAB)

    def sequences_per_forward(self, device: str, seq_len: int,
                              sizes: ModelSizes | None = None) -> int:
        """Sequences per forward pass for ``device``, sequences of ``seq_len`` tokens and a
        model of ``sizes`` (default GPT-2 small's): ``--forward-tokens`` when set, else as
        many as ``etl.memory.forward_tokens`` allows (on the CPU at most ``--batch-size``)."""
        if self.forward_tokens:
            return max(1, self.forward_tokens // seq_len)
        attention = seq_len if "cspa" in self.measures.split(",") else 0  # CSPA's patterns
        budget = forward_tokens(sizes or GPT2_SMALL, cuda=device.startswith("cuda"),
                                attention_len=attention)
        if device.startswith("cuda"):
            return max(1, budget // seq_len)
        return max(1, min(self.batch_size, budget // seq_len))

    def fingerprint(self) -> str:
        """8 hex digits over every field that changes the numbers."""
        values = asdict(self)
        values.pop("chunk_tokens")  # results do not depend on these
        values.pop("kernel")
        values.pop("forward_tokens")
        if "cspa" not in self.measures.split(","):
            values.pop("cspa_k")  # no measure reads it
        blob = json.dumps(values, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def default_run_id(self) -> str:
        """The run id derived from the configuration:
        ``<dataset>-<model>[-<variant>-variant][-<lens>-lens][-<ablation>-ablation]-<hash>``
        (``<hash>``: ``fingerprint``), naming the IOI variant, the lens and the ablation only
        where they are not the defaults: ``ioi-gpt2-3f9a01c2``, ``ioi-gpt2-abc-variant-150b7eba``,
        ``ioi-gpt2-recomputed-ln-lens-mean-ablation-5d0e77b1``."""
        model = Path(self.model.rstrip("/")).name or "model"
        model = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.")[:40] or "model"
        parts = [self.dataset, model]
        if self.ioi_variant != IOI_VARIANTS[0]:
            parts.append(f"{self.ioi_variant}-variant")
        if self.lens != LENS_MODES[0]:
            parts.append(f"{self.lens}-lens")
        if self.ablation != ABLATION_MODES[0]:
            parts.append(f"{self.ablation}-ablation")
        return "-".join([*parts, self.fingerprint()])


@dataclass
class RunOptions:
    """How and where a run is done; none of it changes the numbers. Each field is a flag,
    like ``ExtractConfig``'s."""

    device: str = field(default="auto", metadata=option(
        "auto = cuda when available", choices=("auto", "cpu", "cuda")))
    pipeline: str = field(default="auto", metadata=option(
        "overlap the next batch's device work with the previous batches' table building "
        "and writing (auto = on for CUDA)", choices=PIPELINE_MODES))
    warehouse: str = field(default=DEFAULT_WAREHOUSE, metadata=option(
        "warehouse root: a folder or s3://bucket/prefix"))
    run_id: str | None = field(default=None, metadata=option(
        "run id (default: derived from the configuration)"))
    overwrite: bool = field(default=False, metadata=option(
        "replace an existing complete run with the same id"))
    restart: bool = field(default=False, metadata=option(
        "discard the staged batches of an interrupted run with the same id instead of "
        "resuming from them"))
    progress: bool = field(default=True, metadata=option(
        "hide progress bars", flag="--no-progress"))
    allow_large: bool = field(default=False, metadata=option(
        f"allow a run above {MAX_RUN_TOKENS:,} tokens (estimated from the options before "
        "anything is read)"))
    workers: int = field(default=1, metadata=option(
        "processes that measure batches, each with its own copy of the model (one per GPU); "
        "above 1 they run on Ray: a local instance started for the run, or the cluster at "
        "--ray-address"))
    ray_address: str | None = field(default=None, metadata=option(
        "the Ray cluster for --workers (default: RAY_ADDRESS when set, else a local "
        "instance)", metavar="ADDRESS"))

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise UserError(f"--workers must be between 1 and {MAX_WORKERS:,}")


def add_arguments(parser: argparse.ArgumentParser, cls, unset: tuple[str, ...] = ()) -> None:
    """Add a flag to ``parser`` for every field of the dataclass ``cls`` (see ``option``).

    A bool field is a switch that flips its default; a field named in ``unset`` defaults
    to None in the parser (so that a given flag can be told from one left out), and its
    help still names the dataclass default.
    """
    types = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        help_text = meta.pop("help")
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, help=help_text,
                                action="store_false" if f.default else "store_true")
            continue
        default = None if f.name in unset else f.default
        kind = meta.pop("type", _argument_type(types[f.name]))
        shown = "" if f.default in (None, MISSING) else f"; default {f.default}"
        parser.add_argument(flag, dest=f.name, default=default, type=kind,
                            help=help_text + shown, **meta)


def _argument_type(annotation) -> type:
    """The argparse ``type`` of a field annotated ``annotation``: ``int`` or ``str``, also
    when optional (``str | None``)."""
    kinds = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
    if len(kinds) != 1 or kinds[0] not in (int, str):
        raise TypeError(f"no flag type for a field annotated {annotation!r}")
    return kinds[0]


def config_from_args(args) -> ExtractConfig:
    """The ``ExtractConfig`` of parsed ``python -m etl.extract`` arguments.

    Dataset-specific options that the parser left at None (not given) get their defaults;
    one given for a dataset it does not apply to is refused, so the manifest never records
    a setting that had no effect.
    """
    for name, (flag, datasets) in DATASET_OPTIONS.items():
        if getattr(args, name) is not None and args.dataset not in datasets:
            raise UserError(f"{flag} does not apply to --dataset {args.dataset} (only to "
                            f"{' and '.join(datasets)}); leave it out")
    given = {f.name: getattr(args, f.name) for f in fields(ExtractConfig)}
    return ExtractConfig(**{k: v for k, v in given.items() if v is not None})


def run_options_from_args(args) -> RunOptions:
    """The ``RunOptions`` of parsed ``python -m etl.extract`` arguments."""
    return RunOptions(**{f.name: getattr(args, f.name) for f in fields(RunOptions)})
