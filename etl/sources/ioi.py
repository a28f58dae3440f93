"""The Indirect Object Identification prompt set, seed-compatible with the published generator.

Wang et al. 2022 ("Interpretability in the Wild") generated IOI prompts with Python's
``random``; the copy-suppression study used N=100, seed 420, "mixed" templates. This module
draws in the same order from the same stimuli (``stimuli/ioi_stimuli.json``), so prompt
``i`` for a given seed is the published prompt ``i``:

1. seed ``random``, numpy and torch with the dataset seed;
2. templates = BABA[:7] + ABBA[:7], shuffled with ``random.shuffle``;
3. per prompt: ``random.choice(templates)``; three names by ``random.choice`` each,
   redrawn together until distinct; ``random.choice(places)``; ``random.choice(objects)``;
4. fill ``[PLACE]``, ``[OBJECT]``, then ``[A]`` = indirect object (IO), ``[B]`` = subject (S).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

ROLES = ("S1", "IO", "S2", "end", "answer")
"""Per-position roles recorded in the ``tokens`` table."""


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt."""

    text: str
    """The full sentence, ending with the answer (the IO name)."""
    io: str
    """Indirect object: the answer."""
    s: str
    """Subject: named twice (S1, S2)."""
    template_index: int
    """Index of the template in the shuffled template list."""
    template: str
    """The template that was filled."""
    place: str
    """The ``[PLACE]`` filler."""
    obj: str
    """The ``[OBJECT]`` filler."""


def load_stimuli() -> dict:
    """Names, places, objects and the 15 BABA templates, in their original order."""
    text = resources.files("etl.sources").joinpath("stimuli/ioi_stimuli.json").read_text("utf-8")
    return json.loads(text)


def abba_from_baba(template: str) -> str:
    """Swap the first ``[B]`` and the first ``[A]`` of a BABA template (→ ABBA)."""
    first_b, first_a = template.index("[B]"), template.index("[A]")
    chars = list(template)
    chars[first_b + 1], chars[first_a + 1] = "A", "B"
    return "".join(chars)


def mixed_templates(baba: list[str], rng: random.Random | None = None) -> list[str]:
    """BABA[:n//2] + ABBA[:n//2] shuffled by the module-level ``random`` (or ``rng``)."""
    half = len(baba) // 2
    templates = baba[:half] + [abba_from_baba(t) for t in baba][:half]
    (rng or random).shuffle(templates)
    return templates


def generate_prompts(n_prompts: int = 100, seed: int = 420) -> list[IOIPrompt]:
    """Generate ``n_prompts`` IOI prompts exactly as the published generator does.

    Seeds Python's ``random``, numpy and torch globally, as the original did, so that any
    later draws (the ABC set) follow the same stream.
    """
    stimuli = load_stimuli()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    templates = mixed_templates(stimuli["baba_templates"])
    names, places, objects = stimuli["names"], stimuli["places"], stimuli["objects"]
    prompts = []
    for _ in range(n_prompts):
        template = random.choice(templates)
        name_1 = name_2 = name_3 = ""
        while len({name_1, name_2, name_3}) < 3:
            name_1 = random.choice(names)
            name_2 = random.choice(names)
            name_3 = random.choice(names)
        place = random.choice(places)
        obj = random.choice(objects)
        text = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
        text = text.replace("[A]", name_1).replace("[B]", name_2)
        prompts.append(IOIPrompt(text=text, io=name_1, s=name_2,
                                 template_index=templates.index(template), template=template,
                                 place=place, obj=obj))
    return prompts


def corrupt_abc(prompts: list[IOIPrompt], seed: int) -> list[IOIPrompt]:
    """The "ABC" corrupted set: the first three name occurrences replaced by random names.

    The three replacements are drawn with ``random.Random(seed)`` (not forced distinct), so
    the answer no longer follows from the context. The answer (last word) is kept.
    """
    rng = random.Random(seed)
    names = load_stimuli()["names"]
    out = []
    for prompt in prompts:
        words = prompt.text.split(" ")
        replaced = 0
        for i, word in enumerate(words[:-1]):
            bare = word.rstrip(",.")
            if replaced < 3 and bare in (prompt.io, prompt.s):
                words[i] = rng.choice(names) + word[len(bare):]
                replaced += 1
        out.append(IOIPrompt(text=" ".join(words), io=prompt.io, s=prompt.s,
                             template_index=prompt.template_index, template=prompt.template,
                             place=prompt.place, obj=prompt.obj))
    return out


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens (the caller prepends BOS)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_roles(token_ids: list[int], prompt: IOIPrompt, tokenizer) -> dict[int, str]:
    """Map positions of ``token_ids`` (BOS first, no padding) to IOI roles.

    IO and S1 are the first occurrences of the IO and subject name tokens, S2 the
    subject's second occurrence, ``answer`` the last token and ``end`` the one before it.
    Names in the stimuli are single GPT-2 tokens with their leading space.
    """
    io_id = encode(tokenizer, " " + prompt.io)
    s_id = encode(tokenizer, " " + prompt.s)
    roles: dict[int, str] = {}
    last = len(token_ids) - 1
    body = token_ids[:last]
    if len(io_id) == 1 and io_id[0] in body:
        roles[body.index(io_id[0])] = "IO"
    if len(s_id) == 1:
        s_positions = [i for i, t in enumerate(body) if t == s_id[0]]
        if s_positions:
            roles[s_positions[0]] = "S1"
        if len(s_positions) > 1:
            roles[s_positions[1]] = "S2"
    roles[last - 1] = "end"
    roles[last] = "answer"
    return roles
