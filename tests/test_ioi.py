"""The IOI generator reproduces the published prompt set (N=100, seed 420)."""

import random

import numpy as np
import pytest

from etl.sources.corpus import ioi_token_set
from etl.sources.ioi import (
    abba_from_baba,
    corrupt_abc,
    generate_prompts,
    load_stimuli,
    mixed_templates,
)

# Published generator, seed 420, N=100 (prompt index: text).
PUBLISHED = {
    0: "Then, Simon and Max were thinking about going to the office. "
       "Max wanted to give a drink to Simon",
    1: "Then, Ian and Brandon were working at the restaurant. Ian decided to give a kiss to "
       "Brandon",
    2: "Then, Cole and Kelly were working at the garden. Cole decided to give a basketball to "
       "Kelly",
    99: "Then, Anna and Collins went to the garden. Collins gave a snack to Anna",
}
# GPT-2 token ids of prompt 0 with BOS prepended (" the" = 262, " to" = 284, "." = 13).
PROMPT_0_IDS = [50256, 6423, 11, 11288, 290, 5436, 547, 3612, 546, 1016, 284, 262, 2607, 13,
                5436, 2227, 284, 1577, 257, 4144, 284, 11288]


@pytest.fixture(scope="module")
def prompts():
    return generate_prompts(100, 420)


def test_published_prompts_are_reproduced(prompts):
    for index, text in PUBLISHED.items():
        assert prompts[index].text == text


def test_io_and_subject_are_recorded(prompts):
    assert (prompts[0].io, prompts[0].s) == ("Simon", "Max")
    assert all(p.text.endswith(" " + p.io) for p in prompts)
    assert all(p.text.count(p.s) == 2 and p.io != p.s for p in prompts)


def test_generator_is_deterministic_and_seed_dependent():
    assert [p.text for p in generate_prompts(20, 420)] == \
        [p.text for p in generate_prompts(20, 420)]
    assert [p.text for p in generate_prompts(20, 421)] != \
        [p.text for p in generate_prompts(20, 420)]


def test_draw_order_matters():
    """Drawing the object before the place (a plausible slip) gives other prompts."""
    stimuli = load_stimuli()
    random.seed(420)
    templates = mixed_templates(stimuli["baba_templates"])
    template = random.choice(templates)
    names = stimuli["names"]
    a = b = c = ""
    while len({a, b, c}) < 3:
        a, b, c = random.choice(names), random.choice(names), random.choice(names)
    obj, place = random.choice(stimuli["objects"]), random.choice(stimuli["places"])
    swapped = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
    swapped = swapped.replace("[A]", a).replace("[B]", b)
    assert swapped != PUBLISHED[0]


def test_abba_swaps_first_b_and_first_a():
    baba = "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]"
    assert abba_from_baba(baba) == \
        "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]"


def test_mixed_templates_take_seven_of_each():
    baba = load_stimuli()["baba_templates"]
    templates = mixed_templates(baba, random.Random(0))
    assert len(templates) == 14
    assert sorted(templates) == sorted(baba[:7] + [abba_from_baba(t) for t in baba[:7]])


def test_token_ids_roles_and_padding(tokenizer):
    tokens = ioi_token_set(tokenizer, 100, 420, "clean")
    assert tokens.token_ids[0].tolist() == PROMPT_0_IDS
    assert tokens.token_ids[:, 0].tolist() == [50256] * 100
    assert tokens.seq_len == max((~tokens.is_pad).sum(axis=1))
    assert np.all(tokens.token_ids[tokens.is_pad] == 50256)  # right-padded with EOS
    # padding only at the right end of each row
    assert np.all(np.diff(tokens.is_pad.astype(int), axis=1) >= 0)
    roles = {pos: role for (seq, pos), role in tokens.roles.items() if seq == 0}
    assert roles == {3: "IO", 5: "S1", 14: "S2", 20: "end", 21: "answer"}
    for seq in range(100):
        seq_roles = {role for (s, _), role in tokens.roles.items() if s == seq}
        assert seq_roles == {"IO", "S1", "S2", "end", "answer"}


def test_abc_set_replaces_three_names_and_keeps_length(tokenizer, prompts):
    abc = corrupt_abc(prompts, 420)
    assert all(a.text != p.text for a, p in zip(abc, prompts, strict=True))
    assert all(a.text.split(" ")[-1] == p.io for a, p in zip(abc, prompts, strict=True))
    both = ioi_token_set(tokenizer, 100, 420, "both")
    assert both.n_seqs == 200 and both.variant[:100] == ["clean"] * 100
    assert both.variant[100:] == ["abc"] * 100 and both.example[100:] == list(range(100))
    clean_len = (~both.is_pad[:100]).sum(axis=1)
    abc_len = (~both.is_pad[100:]).sum(axis=1)
    assert np.array_equal(clean_len, abc_len)
