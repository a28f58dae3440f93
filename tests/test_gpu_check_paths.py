"""The GPU check's timing of kernel configurations (``etl.bench.gpu_kernels``), run on the CPU
through Triton's interpreter with its CUDA timer replaced: every configuration of the check,
folded or not, runs and is checked against float64 before the check spends device time."""

import torch

from etl.bench import gpu_kernels
from etl.bench.random_layer import random_layer
from etl.lens.kernel_config import KernelConfig


def test_every_configuration_of_the_check_runs_and_is_checked(monkeypatch):
    calls = []

    def bench(fn, reps=10):
        fn()
        calls.append(1)
        return 2.0

    monkeypatch.setattr(gpu_kernels, "_bench", bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    inputs, w, w_u = random_layer(70, 2, 64, 300, generator=torch.Generator().manual_seed(0),
                                  device="cpu", d_model=64)
    configs = [KernelConfig(64, 64, 4, 1, merge_block_t=16, merge_block_j=4,
                            fold=c.fold, tma=c.tma, warp_specialize=c.warp_specialize,
                            poly_resid=c.poly_resid)
               for c in gpu_kernels.CONFIGS]
    rows = gpu_kernels.time_layer_configs(inputs, (w, w_u), lens_ms=1.0, n_layers=4,
                                          configs=configs)
    assert len(rows) == len(configs) == len(calls)
    assert any(gpu_kernels.config_label(c).endswith("fold tma ws poly") for c in configs)
    for row, config in zip(rows, configs, strict=True):
        assert "error" not in row, row
        assert row["max_abs_err"] < 1e-5
        # a folded layer pays a quarter of the one lens product (layer 0's), others all of it
        assert row["lens_ms"] == (0.25 if config.fold else 1.0)
        assert row["tokens_per_s"] == 70 / (4 * (2.0 + row["lens_ms"]) / 1e3)


def test_the_llama_part_runs_at_a_small_shape(monkeypatch):
    from etl.bench import gpu_llama

    monkeypatch.setattr(gpu_kernels, "_bench", lambda fn, reps=10: (fn(), 2.0)[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(gpu_llama, "ceilings", lambda: {
        "copy_bytes_per_s": 3e12, "f16_flop_per_s": 7e14, "exp_per_s_datasheet": 3.7e12})
    small = {"layers": 4, "heads": 2, "d_head": 32, "d_model": 64, "vocab": 200}
    result = gpu_llama.llama_figure(20, seed=0, shape=small, device="cpu")
    assert [r["config"] for r in result["configs"]] == [
        gpu_kernels.config_label(c) for c in gpu_llama.TIMED]
    lower = min(result["floors"]["exp_bound_tokens_per_s"],
                result["floors"]["flop_bound_tokens_per_s"])
    for row in result["configs"]:
        assert "error" not in row and row["max_abs_err"] < 1e-5, row
        assert row["share_of_lower_floor"] == row["tokens_per_s"] / lower


def test_the_kernel_compiles_for_hopper_without_a_gpu():
    """``kernel_resources`` compiles the real launch for sm_90 (outside the interpreter,
    so in a process of its own) and reads registers and Hopper instructions off the
    machine code."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json; from etl.bench.kernel_resources import report; "
              "from etl.lens.kernel_config import FOLDED, KernelConfig; "
              "shape = {'heads': 2, 'd_head': 64, 'd_model': 64, 'vocab': 256}; "
              "print(json.dumps(report([KernelConfig(), FOLDED], shape)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["sums"] for r in rows] == [False, True, False, True]
    for row in rows:
        assert "error" not in row, row
        assert 0 < row["registers"] <= 255 and row["HGMMA"] > 0 and row["shared_bytes"] > 0
    assert rows[0]["UTMALDG"] == 0 and rows[2]["UTMALDG"] > 0  # the copy engine: FOLDED's


def test_the_report_refuses_the_interpreter():
    import pytest

    from etl.bench.kernel_resources import launch_arguments
    from etl.lens.kernel_config import FOLDED

    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        launch_arguments(FOLDED, {"heads": 1, "d_head": 16, "d_model": 16, "vocab": 64}, False)
