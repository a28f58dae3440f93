"""Without a reachable hub, a missing hub model or dataset fails at once with one line.

Each case runs ``python -m etl.extract`` in a subprocess with an empty ``HF_HOME`` and the
hub pointed at a closed local port (directly and through the proxy variables), so nothing
leaves the machine. Without ``HF_HUB_OFFLINE`` the hub is asked once, without retries; with
``HF_HUB_OFFLINE=1`` nothing is sent at all (a listening socket checks that).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_COMMAND_S = 10.0
"""The command after its imports (the hub client's retries alone took about 28 s)."""
MAX_TOTAL_S = 15.0
"""The whole command, imports and interpreter start included; on a busy machine where the
imports alone take longer, the bound is the imports plus ``MAX_COMMAND_S`` plus 5 s."""
RUN = """
import sys, time
start = time.perf_counter()
import etl.extract
PRELOAD
imported = time.perf_counter()
try:
    code = etl.extract.main(sys.argv[1:])
finally:
    print(f"timing: imports {imported - start:.3f} command {time.perf_counter() - imported:.3f}",
          file=sys.stderr)
sys.exit(code)
"""
PRELOAD_MODEL = "import datasets, transformers\nfrom transformer_lens.model_bridge import " \
    "TransformerBridge"
"""Imports of a run that loads a model, done before the command's clock starts."""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, endpoint: str, offline: bool) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
           and k.upper() not in ("NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    home = tmp_path / "hf-home"
    home.mkdir(exist_ok=True)
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HTTP_PROXY=endpoint,
               HTTPS_PROXY=endpoint, ALL_PROXY=endpoint, TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _extract(tmp_path: Path, env: dict, *args: str, preload: str = "",
             max_command: float = MAX_COMMAND_S) -> subprocess.CompletedProcess:
    """Run ``python -m etl.extract`` (as its ``main``, after the imports of ``etl.extract``
    and ``preload``); check and print its timings."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUN.replace("PRELOAD", preload),
                           "--no-progress", "--warehouse", str(tmp_path / "wh"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    total = time.perf_counter() - start
    timing = [line.split() for line in proc.stderr.splitlines() if line.startswith("timing:")]
    assert timing, proc.stderr
    imports, command = float(timing[-1][2]), float(timing[-1][4])
    print(f"etl.extract {' '.join(args) or '(defaults)'}: exit {proc.returncode}, "
          f"{total:.1f} s in all, imports {imports:.1f} s, command {command:.1f} s")
    assert command < max_command, proc.stderr
    assert total < max(MAX_TOTAL_S, imports + max_command + 5), proc.stderr
    return proc


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Retrying" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture
def silent_hub():
    """A listening socket that never answers; yields (endpoint, connections accepted)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.setblocking(False)

    def accepted() -> int:
        count = 0
        while True:
            try:
                conn, _ = server.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()


def test_default_model_hub_unreachable(tmp_path):
    proc = _extract(tmp_path, _env(tmp_path, f"http://127.0.0.1:{_closed_port()}", False))
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc)
    assert "'openai-community/gpt2'" in line and "--model DIR" in line, line


def test_default_model_hf_hub_offline_sends_nothing(tmp_path, silent_hub):
    endpoint, accepted = silent_hub
    proc = _extract(tmp_path, _env(tmp_path, endpoint, offline=True))
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc)
    assert "'openai-community/gpt2'" in line and "--model DIR" in line, line
    assert accepted() == 0


def test_silent_hub_costs_one_request(tmp_path, silent_hub):
    """A hub that accepts connections but never answers costs one probe timeout."""
    endpoint, accepted = silent_hub
    proc = _extract(tmp_path, _env(tmp_path, endpoint, offline=False))
    assert proc.returncode == 2, proc.stderr
    assert "'openai-community/gpt2'" in _error_line(proc)
    assert accepted() == 1  # one request, no retries


def _openwebtext(tmp_path, tiny_checkpoint, endpoint, offline):
    proc = _extract(tmp_path, _env(tmp_path, endpoint, offline), "--model",
                    str(tiny_checkpoint), "--dataset", "openwebtext", "--seq-len", "64",
                    preload="import datasets")  # read before the model loads
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc)
    assert "'stas/openwebtext-10k'" in line and "--dataset text --data-files" in line, line


def test_openwebtext_hub_unreachable(tmp_path, tiny_checkpoint):
    _openwebtext(tmp_path, tiny_checkpoint, f"http://127.0.0.1:{_closed_port()}", False)


def test_missing_openwebtext_fails_before_the_model_loads(tmp_path, tiny_checkpoint,
                                                         monkeypatch, capsys):
    import etl.extract
    import etl.run.runner

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset was read")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(etl.run.runner, "load_model", no_load)
    code = etl.extract.main(["--model", str(tiny_checkpoint), "--seq-len", "64",
                             "--warehouse", str(tmp_path / "wh"), "--no-progress"])
    assert code == 2
    assert "'stas/openwebtext-10k'" in capsys.readouterr().err


def _cache_model(env: dict, checkpoint: Path, drop: tuple[str, ...] = ()) -> None:
    """``checkpoint`` as the hub model ``acme/tiny`` in the cache of ``env`` (without the
    tensors ``drop``)."""
    from safetensors.torch import load_file, save_file

    repo = Path(env["HF_HOME"]) / "hub" / "models--acme--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    if drop:
        weights = load_file(snapshot / "model.safetensors")
        save_file({k: v for k, v in weights.items() if k not in drop},
                  snapshot / "model.safetensors", metadata={"format": "pt"})


def test_cached_hub_model_loads_when_hub_unreachable(tmp_path, tiny_checkpoint):
    """A hub id in the local cache is read from it, without the hub client's retries."""
    env = _env(tmp_path, f"http://127.0.0.1:{_closed_port()}", False)
    _cache_model(env, tiny_checkpoint)
    proc = _extract(tmp_path, env, "--model", "acme/tiny", "--dataset", "ioi", "--n-prompts",
                    "2", preload=PRELOAD_MODEL, max_command=30)
    assert proc.returncode == 0, proc.stderr
    assert "Retrying" not in proc.stderr, proc.stderr


def test_a_damaged_cached_hub_model_is_refused_naming_the_tensor(tmp_path, tiny_checkpoint):
    env = _env(tmp_path, f"http://127.0.0.1:{_closed_port()}", False)
    _cache_model(env, tiny_checkpoint, drop=("transformer.h.0.mlp.c_proj.weight",))
    proc = _extract(tmp_path, env, "--model", "acme/tiny", "--dataset", "ioi", "--n-prompts",
                    "2", preload=PRELOAD_MODEL, max_command=30)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "transformer.h.0.mlp.c_proj.weight is missing" in errors[0], \
        proc.stderr
