"""The web demo, end to end in a real headless Chromium: the page loads, an image gets labels, a non-image a message."""

import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no phoning home

gr = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'mambaout[demo]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")

from mambaout.inference.demo_app import ModelPool, build_app, launch, model_choices  # noqa: E402

CHROMIUM = os.environ.get("MAMBAOUT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CLASS_NAMES = ["alpha cat", "beta dog", "gamma bird"]
EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "mambaout" / "examples" / "cat.jpg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(make_test_checkpoint) -> Path:
    eval_config = dict(input_size=[3, 64, 64], crop_pct=1.0, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)
    return make_test_checkpoint(CLASS_NAMES, eval_config)


@pytest.fixture(scope="module")
def server(checkpoint):
    app = build_app(None, checkpoint=str(checkpoint), topk=3)
    _, url, _ = launch(app, port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    app.close()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    if not os.path.isfile(CHROMIUM):
        pytest.skip(f"chromium not found at {CHROMIUM}; install it (apt-get install chromium) or set MAMBAOUT_CHROMIUM")
    with sync_api.sync_playwright() as p:
        # a persistent context on a fresh folder: an empty profile, nothing shared with a user's browser
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        page = context.new_page()
        page.set_default_timeout(30_000)
        outside = []
        page.on("request", lambda r: outside.append(r.url) if "127.0.0.1" not in r.url else None)
        page.outside_requests = outside
        yield page
        context.close()


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#image input[type=file]", state="attached")


@pytest.mark.browser
def test_image_gets_labels(page, server):
    _open(page, server)
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLE))
    page.wait_for_selector("#image img")  # the upload reached the server and shows as a preview
    page.click("#classify")
    page.wait_for_function("document.querySelector('#labels').innerText.includes('%')")
    text = page.locator("#labels").inner_text()
    assert all(name in text for name in CLASS_NAMES), text  # top-3 of 3 classes: every stored name shows
    assert page.outside_requests == []  # the page works offline: nothing fetched beyond the app itself


@pytest.mark.browser
@pytest.mark.parametrize("name, content", [("notes.txt", b"plain text"), ("broken.jpg", b"not a JPEG at all")])
def test_non_image_shows_message(page, server, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    _open(page, server)
    page.locator("#image input[type=file]").set_input_files(str(path))
    if name.endswith(".jpg"):
        # the browser accepts it by its name; the server must decline it with our message
        page.wait_for_selector("#image img, #image button", state="attached")
    page.click("#classify")
    # .txt: Gradio's browser side refuses the type; .jpg: the server's decode fails with our gr.Error
    message = "Only image/* allowed" if name.endswith(".txt") else f"{name} is not an image this demo can read"
    page.get_by_text(message).first.wait_for()
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and "%" not in page.locator("#labels").inner_text()


def test_model_pool_offers_only_the_allow_list(checkpoint, tmp_path):
    allowed = model_choices("mambaout_test", random_weights=True)
    assert allowed == {"mambaout_test (random weights)": ("random", "mambaout_test")}
    assert model_choices(checkpoint=str(checkpoint)) == {str(checkpoint): ("checkpoint", str(checkpoint))}
    pool = ModelPool({**allowed, **model_choices(checkpoint=str(checkpoint))}, topk=2)
    predictor = pool.get(str(checkpoint))
    assert predictor.class_names.names == tuple(CLASS_NAMES) and pool.get(str(checkpoint)) is predictor
    assert pool.get("mambaout_test (random weights)").model.num_classes == 1000
    # anything else gets one answer, whether it names a file that exists, one that does not, or nothing:
    # the server neither loads it nor tells which
    other = tmp_path / "other.safetensors"
    other.write_bytes(checkpoint.read_bytes())
    for choice in (str(other), str(tmp_path / "missing.safetensors"), "/etc/passwd", "mambaout_femto.in1k", " "):
        with pytest.raises(ValueError) as e:
            pool.get(choice)
        assert str(e.value) == "choose one of the models this server offers"


def test_server_refuses_a_model_off_the_list(server, checkpoint, tmp_path):
    """Through the HTTP API too: a value not on the dropdown never reaches the model loader."""
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    ok = client.predict(handle_file(str(EXAMPLE)), str(checkpoint), api_name="/classify")
    assert {c["label"] for c in ok["confidences"]} == set(CLASS_NAMES)
    errors = []
    for choice in ("/etc/passwd", str(checkpoint.parent / "missing.safetensors")):
        with pytest.raises(Exception) as e:
            client.predict(handle_file(str(EXAMPLE)), choice, api_name="/classify")
        errors.append(str(e.value).replace(choice, "X"))
    assert errors[0] == errors[1]  # the same answer for a file that exists and one that does not
