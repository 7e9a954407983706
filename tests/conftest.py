import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

from mambaout.utils import threads as _threads

# The test run follows the commands' thread policy: as many torch threads as cores are free while torch loads, at
# most 2 (tiny test tensors gain nothing from more); a test run beside a busy process otherwise took 12 min
# (issue 27). MAMBAOUT_THREADS=N or OMP_NUM_THREADS=N fix the count. Under pytest-xdist (addopts' `-n auto`: one
# worker per usable core) each worker gets its share of the cores, 1 thread on 2 cores: two processes with 2 threads
# each on 2 cores wait on each other at every op's barrier. (Not through OMP_NUM_THREADS in the environment: the
# commands the tests start then all see it, and test_hostile's Ctrl-C in predict exits 0 instead of 130 with it.)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
SHARE = max(1, min(2, _threads.usable_cores() // WORKERS))
_threads.begin()
import torch  # noqa: E402

_threads.settle(most=SHARE)

SHARED_DATA = Path(os.environ.get("MAMBAOUT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The research-only test images (../shared/data or $MAMBAOUT_SHARED_DATA); skips when absent."""
    if not (SHARED_DATA / "imagenette2-112-val.tar").is_file():
        pytest.skip(
            f"shared test data not found at {SHARED_DATA}; set MAMBAOUT_SHARED_DATA to the folder holding the tars"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def make_test_checkpoint(tmp_path_factory):
    """Writes a `mambaout_test` checkpoint as `mambaout train` would: weights plus class names and eval settings."""
    import mambaout

    def make(class_names, eval_config, perturb: float = 0.0, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        model = mambaout.create_model("mambaout_test", num_classes=len(class_names))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
        path = tmp_path_factory.mktemp("ckpt") / f"{len(class_names)}-classes.safetensors"
        return mambaout.save_weights(
            model,
            path,
            model="mambaout_test",
            model_kwargs={"num_classes": len(class_names)},
            class_names=list(class_names),
            eval_config=eval_config,
        )

    return make


@pytest.fixture(scope="session")
def _kernel_cache(tmp_path_factory):
    """One folder for the compiled CPU kernels (kernels/native.py) per test run, shared by every test and the
    programs they start: built once, not once per test."""
    return tmp_path_factory.getbasetemp().parent / "kernels"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, _kernel_cache):
    """Downloads in tests never touch the user's cache."""
    monkeypatch.setenv("MAMBAOUT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAMBAOUT_KERNEL_CACHE", str(_kernel_cache))
    monkeypatch.delenv("MAMBAOUT_MIRROR", raising=False)


class FileServer:
    """A static file server for `root` on 127.0.0.1 that counts requests."""

    def __init__(self, root):
        self.hits = 0
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


@pytest.fixture
def file_server():
    """Serve a folder over HTTP on 127.0.0.1: `file_server(root)` -> a `FileServer` (closed after the test)."""
    servers = []

    def serve(root) -> FileServer:
        servers.append(FileServer(root))
        return servers[-1]

    yield serve
    for server in servers:
        server.close()


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: the shares are of the tests that run
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the long tests (those that declare a longer timeout) are dealt out among the workers.

    `--dist worksteal` first gives each worker a contiguous share of the list (worker k of n: len // n items, the
    last one the rest), and an idle worker later takes over half of what another has left, from its end. So each
    share starts with its long tests, longest first, dealt to the share with the least declared time so far, and is
    filled up to its size with the other tests in the files' order. The long tests of one module with one timeout
    go to one worker together, since they may share a module fixture (tests/test_distributed.py's five trainings)."""
    if not hasattr(config, "workerinput"):  # the order of a run in one process stays the files' order
        return
    default = float(config.getini("timeout") or 0)
    workers = int(config.workerinput["workercount"])

    def declared(item) -> float:
        mark = item.get_closest_marker("timeout")
        return float(mark.args[0]) if mark and mark.args else default

    groups: dict[tuple, list] = {}
    for item in sorted(items, key=lambda item: -declared(item)):
        if declared(item) > default:
            groups.setdefault((item.module.__name__, declared(item)), []).append(item)
    short = [item for item in items if declared(item) <= default]
    shares, load = [[] for _ in range(workers)], [0.0] * workers
    for (_, seconds), group in groups.items():  # longest first: the dict keeps the sorted order
        k = load.index(min(load))
        shares[k] += group
        load[k] += seconds
    sizes = [len(items) // workers] * (workers - 1)
    sizes.append(len(items) - sum(sizes))
    for k, share in enumerate(shares):
        take = max(0, sizes[k] - len(share)) if k < workers - 1 else len(short)
        share += short[:take]
        del short[:take]
    items[:] = [item for share in shares for item in share]
