"""Object storage that stops answering: every request has a bounded wait, so an extraction
against an endpoint that drops packets (a proxy on 127.0.0.1 that stops forwarding) ends in
one line that says to resume, in bounded time, and the resume publishes the run."""

import json
import socket
import threading
import time

import pytest

from etl.warehouse import StagingArea, Warehouse
from etl.warehouse.lock import STALE_ENV
from etl.warehouse.storage import TIMEOUT_ENV
from tests import test_object_storage
from tests.test_object_storage import _extract, _rows

local_run = test_object_storage.local_run  # the same run in a local warehouse


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``port`` that forwards until ``hold``: from then on it
    keeps accepting connections and reading what is sent, and forwards nothing either way
    (an endpoint whose packets are dropped, not refused)."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.holding = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self.holding.set()

    def release(self) -> None:
        self.holding.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.holding.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()


@pytest.fixture
def proxy(s3_server, monkeypatch):
    import s3fs

    proxy = Proxy(int(s3_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's tries: 1 × s3fs's 5
    monkeypatch.setenv(STALE_ENV, "3")
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy
    proxy.release()
    s3fs.S3FileSystem.clear_instance_cache()


def test_an_endpoint_that_stops_answering_at_publish_ends_in_one_line_then_resumes(
        proxy, local_run, tiny_checkpoint, monkeypatch, capsys):
    url = "s3://bucket/blackholed"
    real = StagingArea.publish

    def publish(self, *args, **kwargs):
        proxy.hold()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StagingArea, "publish", publish)
    capsys.readouterr()
    started = time.monotonic()
    assert _extract(tiny_checkpoint, url, "r") == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same command again to resume" in err, err
    assert elapsed < 60, elapsed  # 1 s a try, 5 tries a request: seconds, not a hang

    monkeypatch.setattr(StagingArea, "publish", real)
    proxy.release()
    time.sleep(3.5)  # the lease the failed run could not delete goes stale
    assert _extract(tiny_checkpoint, url, "r") == 0
    manifest = json.loads(Warehouse(url).manifest_path("r").read_text())
    assert manifest["timing"]["batches_resumed"] >= 1
    assert _rows(url, "r") == _rows(local_run, "r")


def test_a_bad_storage_timeout_is_one_line(monkeypatch):
    from etl.errors import UserError

    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match=f"{TIMEOUT_ENV}='soon' is not a positive number"):
        Warehouse("s3://bucket/x")
