"""Shared fixtures: an offline hub, a random-init tiny GPT-2 checkpoint and its bridge, and
warehouses of real extractions with that checkpoint (built once per test session)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # read at import time by the HF libraries
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-init gpt2-tiny checkpoint directory (2 layers, 4 heads, d_model 64)."""
    from etl.model.random_init import write_checkpoint

    return write_checkpoint("gpt2-tiny", tmp_path_factory.mktemp("models") / "gpt2-tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded as a bridge in compatibility mode (float32, CPU)."""
    from etl.model.loading import load_model

    return load_model(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def tokenizer():
    """GPT-2's tokenizer, built offline."""
    from etl.model.random_init import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def build_warehouse(tiny_checkpoint, tmp_path_factory):
    """``build_warehouse(name, *runs)``: a warehouse folder holding one extraction per
    ``runs`` entry (``python -m etl.extract`` arguments, after the tiny checkpoint, CPU and
    no progress bars), built once per session and name."""
    from etl.extract import main as extract_main

    built: dict = {}

    def build(name: str, *runs: list[str]):
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            for args in runs:
                assert extract_main(["--model", str(tiny_checkpoint), "--warehouse", str(root),
                                     "--no-progress", "--device", "cpu", *args]) == 0, args
            built[name] = (runs, root)
        assert built[name][0] == runs, f"warehouse {name!r} was built with other runs"
        return built[name][1]

    return build


@pytest.fixture(scope="session")
def ioi_warehouse(build_warehouse):
    """A warehouse with one run, ``ioi``: 4 IOI prompts, default lens and ablation."""
    return build_warehouse("ioi-warehouse", ["--dataset", "ioi", "--n-prompts", "4",
                                             "--run-id", "ioi"])


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1 for one test module, with a bucket
    ``bucket`` and the ``AWS_*`` variables pointing at it; stopped, and the variables put
    back, after the module. Yields the endpoint URL."""
    import logging
    import socket
    import urllib.request

    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets per Python process: start from none
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset",
                                                  method="POST"), timeout=10).close()
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
             "AWS_ENDPOINT_URL")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bucket")
    try:
        yield endpoint
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        with socket.socket() as probe:  # nothing is left listening
            assert probe.connect_ex((host, port)) != 0
