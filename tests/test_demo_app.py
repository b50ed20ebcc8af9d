"""The Gradio demo end to end: a CI-trained tiny model served on 127.0.0.1.

- input bounds and the model card, on the loaded model (no server);
- ``gradio_client`` against the running app: images come back, bad input gives the
  message, two concurrent requests at different sizes are drawn by ONE sampler call;
- a real headless Chromium (Debian's /usr/bin/chromium through Playwright) types a
  prompt, clicks Generate, waits for the image, saves a screenshot, sees no console error.

Set MINFM_TEST_ARTIFACTS=DIR to keep the screenshot (``DIR/demo.png``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the demo needs the 'demo' extra (pip install 'minfm[demo]')")
pytest.importorskip("gradio_client", reason="the demo tests need gradio_client")

from demo_helpers import serving  # noqa: E402
from engine_helpers import tiny  # noqa: E402
from minfm_core.errors import MinfmError  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# Same request the page would send, as keyword arguments of the /generate endpoint.
BASE = dict(prompt="a red circle", negative_prompt="", size="16x16", steps=3, cfg_scale=3.0, ep_cfg=False,
            sampler="euler", seed=7, random_seed=False, num_images=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from minfm_core.engine.train import train

    exp = tmp_path_factory.mktemp("demo_run")
    train(tiny(exp, "train.max_steps=4"))
    return exp


@pytest.fixture(scope="module")
def model(run_dir):
    from minfm_apps.model import DemoModel

    return DemoModel.load(str(run_dir), device="cpu", max_images=4)


@pytest.fixture(scope="module")
def served(model):
    """The app on a free loopback port; the batch window is wide so CI load cannot split a batch."""
    with serving(model) as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[2], verbose=False)


# ---- the model side (no server) --------------------------------------------------------------


def test_model_card_and_presets(model, run_dir):
    card = dict(model.card())
    assert card["source"] == str(run_dir)
    assert card["weights"] == "EMA weights at step 4"
    assert f"{model.n_params:,} parameters" in card["denoiser"]
    assert model.n_params == sum(p.numel() for p in model.pipe.denoiser.parameters()) > 0
    assert card["last logged loss"].endswith("at step 4")
    # identity VAE x patch 2: any even side is valid; the trained sizes come first.
    assert model.multiple == 2
    assert model.presets[:3] == [(16, 16), (16, 24), (24, 16)]
    assert all(h % 2 == 0 and w % 2 == 0 for h, w in model.presets)
    assert model.examples == ["a red circle", "a blue square"]
    assert (model.default_steps, model.default_cfg, model.default_sampler) == (4, 3.0, "euler")


@pytest.mark.parametrize("step", ['"4"', "4.5", "-4", "NaN", "1e400", "true", "[4]"])
def test_a_downloaded_folder_with_a_junk_step_still_loads(run_dir, tmp_path, step):
    """An exported (or pulled) folder's step comes from its metrics.jsonl, which is anyone's JSON:
    `"step": "4"` used to end DemoModel.load in int()'s ValueError."""
    from minfm_apps.model import DemoModel
    from minfm_core.checkpoint import export_for_hub

    folder = export_for_hub(run_dir, tmp_path / "exported")
    (folder / "metrics.jsonl").write_text(f'{{"step": {step}, "loss": 0.25}}\n')
    loaded = DemoModel.load(str(folder), device="cpu")
    assert loaded.step is None and dict(loaded.card())["weights"].startswith("EMA weights")


@pytest.mark.parametrize("change, message", [
    ({"prompt": "   "}, "Enter a prompt."),
    ({"prompt": "x" * 501}, "Prompt is 501 characters long; the limit is 500."),
    ({"negative_prompt": "y" * 600}, "Negative prompt is 600 characters long"),
    ({"size": "16 by 16"}, "is not HEIGHTxWIDTH"),
    ({"size": "\uff11\uff16x16"}, "is not HEIGHTxWIDTH"),  # full-width digits: int() reads them, the CLI does not
    ({"size": "17x16"}, "multiples of 2 for this model"),
    ({"size": "4000x16"}, "out of bounds"),
    ({"steps": 0}, "Steps must be between 1 and 100, got 0."),
    ({"steps": 2.5}, "Steps must be a whole number"),
    ({"num_images": 5}, "Number of images must be between 1 and 4, got 5."),
    ({"cfg_scale": float("nan")}, "CFG scale must be between 0 and 20"),
    ({"sampler": "rk45"}, "Unknown sampler 'rk45'; choose one of ddim_sde, euler, heun."),
    ({"seed": -1}, "Seed must be between 0 and"),
    # an API caller's wrong types: drawn as their repr, or bool("false") read as true
    ({"prompt": ["a", "b"]}, "Prompt must be text, got list."),
    ({"negative_prompt": 3}, "Negative prompt must be text, got int."),
    ({"ep_cfg": "false"}, "EP-CFG must be true or false, got 'false'."),
    ({"seed": 1.5}, "Seed must be a whole number, got 1.5."),
    ({"steps": True}, "Steps must be a whole number, got True."),
    ({"num_images": "2"}, "Number of images must be a whole number, got '2'."),
])
def test_bad_requests_are_refused_with_a_message(model, change, message):
    args = {**BASE, **change}
    with pytest.raises(MinfmError, match=message.replace("(", r"\(").replace(".", r"\.")):
        model.check_request(args["prompt"], args["negative_prompt"], args["size"], args["steps"], args["cfg_scale"],
                            args["ep_cfg"], args["sampler"], args["seed"], args["num_images"])


def test_an_image_model_draws_one_frame(model):
    assert not model.makes_clips and model.default_frames == 1 and model.limits.max_frames == 1
    assert "frames" not in dict(model.card())
    _, jobs = model.check_request(**{**BASE_CHECK, "frames": 1})
    assert jobs[0].size == (1, 16, 16)
    with pytest.raises(MinfmError, match=r"This model draws images: Frames must be 1, got 5\."):
        model.check_request(**{**BASE_CHECK, "frames": 5})


BASE_CHECK = dict(prompt="a red circle", neg_prompt="", size="16x16", steps=3, cfg_scale=3.0, ep_cfg=False,
                  sampler="euler", seed=7, n_images=1)


@pytest.mark.parametrize("sampler", ["heun", "ddim_sde"])
def test_one_call_draws_mixed_sizes_deterministically(model, sampler):
    """The batcher packs concurrent requests into one call: an image must not depend on its
    neighbours, also with a sampler that draws fresh noise at every step (ddim_sde)."""
    import numpy as np

    from minfm_apps.model import Job, Settings

    settings = Settings(steps=3, sampler=sampler, cfg_scale=2.0, ep_cfg=True)
    jobs = [Job("a red circle", "", (1, 16, 16), 1), Job("a blue square", "", (1, 24, 16), 2)]
    a = model.run(settings, jobs)
    assert [im.size for im in a] == [(16, 16), (16, 24)]  # PIL sizes are (width, height)
    # The packed batch is exact: an image drawn with a neighbour equals the one drawn alone,
    # and the same with the neighbour behind it.
    for alone, packed in ((model.run(settings, jobs[1:])[0], a[1]), (model.run(settings, jobs[::-1])[1], a[0])):
        assert np.abs(np.asarray(packed, dtype=int) - np.asarray(alone, dtype=int)).max() <= 1


# ---- gradio_client against the running app ----------------------------------------------------


@pytest.mark.slow
def test_generate_endpoint_returns_images_and_seed(client):
    images, seed = client.predict(**{**BASE, "num_images": 2, "size": "16x24"}, api_name="/generate")
    assert seed == 7
    assert [im["caption"] for im in images] == ["seed 7 · 16x24", "seed 8 · 16x24"]
    from PIL import Image

    for im in images:
        with Image.open(im["image"]) as pil:
            assert pil.size == (24, 16) and pil.mode == "RGB"
    # A random seed is drawn and reported.
    _, seed2 = client.predict(**{**BASE, "random_seed": True}, api_name="/generate")
    assert isinstance(seed2, int) and 0 <= seed2 < 2**31


@pytest.mark.slow
def test_an_image_models_api_takes_no_frame_count(client):
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in params] == list(BASE)


@pytest.mark.slow
def test_generate_endpoint_reports_bad_input(client, capfd):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Prompt is 600 characters long; the limit is 500."):
        client.predict(**{**BASE, "prompt": "x" * 600}, api_name="/generate")
    with pytest.raises(AppError, match="Size 17x16: height and width must be multiples of 2"):
        client.predict(**{**BASE, "size": "17x16"}, api_name="/generate")
    # gradio's own slider bounds said "Value 0 is less than minimum value 1." for steps and images alike
    with pytest.raises(AppError, match=r"^Steps must be between 1 and 100, got 1000\.$"):
        client.predict(**{**BASE, "steps": 1000}, api_name="/generate")
    with pytest.raises(AppError, match=r"^Number of images must be between 1 and \d+, got 0\.$"):
        client.predict(**{**BASE, "num_images": 0}, api_name="/generate")
    with pytest.raises(AppError, match=r"^Seed must be between 0 and \d+, got -1\.$"):
        client.predict(**{**BASE, "seed": -1}, api_name="/generate")
    with pytest.raises(AppError, match=r"^CFG scale must be between 0 and \d+, got -1\.$"):
        client.predict(**{**BASE, "cfg_scale": -1}, api_name="/generate")
    # no text: gradio's textbox made str() of it and drew "12345" or "['a', 5]" as a prompt
    with pytest.raises(AppError, match=r"^Prompt must be text, got int\.$"):
        client.predict(**{**BASE, "prompt": 12345}, api_name="/generate")
    with pytest.raises(AppError, match=r"^Negative prompt must be text, got dict\.$"):
        client.predict(**{**BASE, "negative_prompt": {"a": 1}}, api_name="/generate")
    # bad input is the client's to fix: the server's log shows no traceback for it
    assert "Traceback" not in capfd.readouterr().err
    # The highest seed one image may start at (seeds run seed .. seed + n - 1 < 2**31)
    _, seed = client.predict(**{**BASE, "seed": 2**31 - 1}, api_name="/generate")
    assert seed == 2**31 - 1
    with pytest.raises(AppError, match=f"Seed must be between 0 and {2**31 - 2}"):
        client.predict(**{**BASE, "seed": 2**31 - 1, "num_images": 2}, api_name="/generate")
    # The server is still healthy afterwards.
    images, _ = client.predict(**BASE, api_name="/generate")
    assert len(images) == 1


@pytest.mark.slow
def test_wrong_types_are_refused_by_name_and_every_call_joins_the_queue(served, client, capfd):
    """gradio's own range check failed with a TypeError on "3" or null (an empty error and a
    traceback in the log); its direct REST route skipped the queue's limit and cancel."""
    import httpx
    from gradio_client.exceptions import AppError

    for change, message in (({"steps": "3"}, "Steps must be a whole number, got '3'."),
                            ({"steps": None}, "Steps must be a whole number, got None."),
                            ({"seed": None}, "Seed must be a whole number, got None."),
                            ({"num_images": "2"}, "Number of images must be a whole number, got '2'."),
                            ({"cfg_scale": None}, "CFG scale must be a number, got None."),
                            ({"sampler": "<b>x</b>"}, "Unknown sampler '&lt;b&gt;x&lt;/b&gt;'; choose one of")):
        with pytest.raises(AppError) as caught:
            client.predict(**{**BASE, **change}, api_name="/generate")
        assert message in str(caught.value), (change, str(caught.value))
    assert "Traceback" not in capfd.readouterr().err
    body = {"data": [BASE[k] for k in BASE]}
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{served[2].rstrip('/')}/gradio_api/run/generate", json=body)
    assert r.status_code == 404 and "join the queue" in r.text


@pytest.mark.slow
def test_a_call_of_no_event_or_the_wrong_inputs_is_refused_without_a_traceback(served, client, capfd):
    """9 of the 10 inputs got `{'error': None}`; `/run/predict` without fn_index and fn_index 99
    a 500: each with a traceback in the server's log, which anyone reaching it could fill."""
    import httpx

    base = served[2].rstrip("/")
    index = next(i for i, fn in served[0].fns.items() if fn.api_name == "generate")
    data = [BASE[k] for k in BASE]
    with httpx.Client(timeout=60) as http:
        short = http.post(f"{base}/gradio_api/queue/join", json={"data": data[:-1], "fn_index": index, "session_hash": "x"})
        none = http.post(f"{base}/gradio_api/queue/join", json={"data": data, "fn_index": 99, "session_hash": "x"})
        bare = http.post(f"{base}/gradio_api/run/predict", json={"data": data})
    assert (short.status_code, short.text.strip()) == (422, f"This event takes {len(data)} inputs, got {len(data) - 1}.")
    assert (none.status_code, none.text.strip()) == (404, "No such event: fn_index 99.")
    assert (bare.status_code, bare.text.strip()) == (404, "No such event: give fn_index (gradio_client does).")
    assert "Traceback" not in capfd.readouterr().err
    images, _ = client.predict(**BASE, api_name="/generate")  # the right call still draws
    assert len(images) == 1


def _built_app(src):
    """The page's blocks for the model in ``src`` (not served)."""
    from minfm_apps.batcher import Batcher
    from minfm_apps.demo import build_app
    from minfm_apps.model import DemoModel

    loaded = DemoModel.load(str(src), device="cpu", max_images=1)
    batcher = Batcher(lambda s, jobs, cb: loaded.run(s, jobs, cb), window_s=0.0, max_batch=1)
    try:
        return build_app(loaded, batcher)
    finally:
        batcher.close()


def test_the_recipe_panel_masks_secrets(run_dir, tmp_path, monkeypatch):
    """A run's recipe.toml holds its ${VAR}s expanded; the page (and its /config) showed them."""
    import gradio as gr

    from minfm_core.checkpoint import export_for_hub

    folder = export_for_hub(run_dir, tmp_path / "exported")
    monkeypatch.setenv("MY_WANDB_API_KEY", "k3y-0f-the-run")
    token = "hf_" + "x1" * 17
    recipe = folder / "recipe.toml"
    import tomli_w

    from minfm_core.recipe.toml import tomllib

    data = tomllib.loads(recipe.read_text())
    # the examples, the prompt's placeholder and the negative prompt box showed these whole
    data["sample"].update(prompts=["a red circle k3y-0f-the-run", f"a blue square {token}"],
                          neg_prompt="blurry k3y-0f-the-run")
    recipe.write_text(f'# logged to https://bob:pa55word@wandb.example with k3y-0f-the-run\n# {token}\n'
                      + tomli_w.dumps(data))
    app = _built_app(folder)
    shown = next(b for b in app.blocks.values() if isinstance(b, gr.Code)).value
    assert shown.startswith("# logged to https://bob:***@wandb.example with ***\n# ***\n")
    assert not any(secret in str(app.get_config_file()) for secret in ("pa55word", "k3y-0f-the-run", token))


@pytest.mark.slow
def test_concurrent_requests_at_different_sizes_share_one_sampler_call(served, client):
    _, batcher, _ = served
    before = batcher.calls
    first = client.submit(**{**BASE, "size": "16x16", "prompt": "a red circle"}, api_name="/generate")
    second = client.submit(**{**BASE, "size": "24x16", "prompt": "a blue square", "num_images": 2, "seed": 100},
                           api_name="/generate")
    (img1, seed1), (img2, seed2) = first.result(timeout=120), second.result(timeout=120)
    assert (len(img1), len(img2), seed1, seed2) == (1, 2, 7, 100)
    assert batcher.calls == before + 1, "both requests should have been drawn by one sampler call"
    rec = batcher.history[-1]
    assert (rec.requests, rec.images) == (2, 3)
    assert sorted({job.size for job in rec.jobs}) == [(1, 16, 16), (1, 24, 16)]


# ---- a real browser ----------------------------------------------------------------------------


@pytest.mark.slow
def test_browser_types_a_prompt_and_gets_an_image(served, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (CI installs it: apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (browsers not needed)")
    _, batcher, url = served
    before = batcher.calls
    errors: list[str] = []
    shot = tmp_path / "demo.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile per run
            executable_path=CHROMIUM, headless=True, viewport={"width": 1200, "height": 820},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.goto(url, wait_until="networkidle", timeout=60_000)
            # an example fills the prompt (a call of its own event: GuardRequests lets it through)
            page.get_by_text("a red circle", exact=True).first.click()
            page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a red circle'",
                                   timeout=30_000)
            page.locator("#prompt textarea").fill("a blue square")
            page.locator("#generate").click()
            image = page.locator("#gallery img").first
            image.wait_for(state="visible", timeout=120_000)
            page.wait_for_function("() => { const i = document.querySelector('#gallery img');"
                                   " return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
            seed = page.locator("#seed-used input").input_value()
            page.screenshot(path=str(shot), full_page=True)
            # An error quoting what was typed shows it as text: the toast renders HTML
            size = page.locator("#size input")
            size.fill("<b>9</b>x16")
            size.press("Enter")
            page.locator("#generate").click()
            toast = page.locator(".toast-body").first
            toast.wait_for(state="visible", timeout=60_000)
            toast_text, toast_bold = toast.inner_text(), toast.locator("b").count()
        finally:
            browser.close()
    assert batcher.calls > before
    assert seed.isdigit()
    assert "Size '<b>9</b>x16' is not HEIGHTxWIDTH" in toast_text and toast_bold == 0
    assert errors == []
    _save_artifact(shot)


def _save_artifact(shot: Path) -> None:
    """Keep the screenshot small enough to commit (palette PNG) and copy it where asked."""
    from PIL import Image

    with Image.open(shot) as im:
        im.convert("RGB").quantize(colors=128).save(shot, optimize=True)
    assert shot.stat().st_size < 200_000
    dest = os.environ.get("MINFM_TEST_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(dest) / "demo.png")


def test_one_image_at_most_still_builds_and_draws(run_dir):
    # gradio refuses a slider whose ends meet: --max-batch 1 (and --max-steps 1 where the
    # recipe samples in one step) ended the demo at start
    import gradio as gr
    from gradio_client import Client

    from minfm_apps.demo import _slider
    from minfm_apps.model import DemoModel

    assert isinstance(_slider(1, 1, value=1, step=1, label="Steps"), gr.Number)
    assert isinstance(_slider(1, 2, value=1, step=1, label="Steps"), gr.Slider)
    one = DemoModel.load(str(run_dir), device="cpu", max_images=1)
    with serving(one, window_s=0.05) as (_, _, url):
        result = Client(url, verbose=False).predict(**BASE, api_name="/generate")
    assert len(result[0]) == 1


# ---- what the server refuses, and cancelled work -----------------------------------------------


@pytest.mark.parametrize("loss", ['"abc"', "null", "[1]", '{"a": 1}', "1e400", "true"])
def test_a_downloaded_folder_with_a_junk_loss_still_loads(run_dir, tmp_path, loss):
    """`float(metrics["loss"])` ended `minfm demo` at start with a traceback for a junk loss."""
    from minfm_apps.demo import card_markdown
    from minfm_apps.model import DemoModel
    from minfm_core.checkpoint import export_for_hub

    folder = export_for_hub(run_dir, tmp_path / "exported")
    (folder / "metrics.jsonl").write_text(f'{{"step": 4, "loss": {loss}}}\n')
    loaded = DemoModel.load(str(folder), device="cpu")
    assert "last logged loss" not in dict(loaded.card()) and "weights" in card_markdown(loaded)


def test_a_junk_cfg_scale_type_is_refused(model):
    for bad, shown in ((True, "True"), ("inf", "'inf'"), ("3", "'3'")):
        with pytest.raises(MinfmError, match=f"CFG scale must be a number, got {shown}"):
            model.check_request(**{**BASE_CHECK, "cfg_scale": bad})


@pytest.mark.slow
def test_large_bodies_and_uploads_are_refused_before_gradio_reads_them(served, client):
    import httpx

    from minfm_apps.demo import MAX_BODY_BYTES

    url = served[2].rstrip("/")
    big = b'{"data": ["' + b"a" * (MAX_BODY_BYTES + 10) + b'"]}'
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{url}/gradio_api/call/generate", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "Request body too large" in r.text

        def chunked():  # no Content-Length: the bytes are counted as they come
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b" " * 65536

        r = http.post(f"{url}/gradio_api/call/generate", content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "Request body too large" in r.text
        r = http.post(f"{url}/gradio_api/upload", files={"files": ("a.txt", b"hello")})
        assert r.status_code == 403 and "no uploads" in r.text
    # ordinary requests still pass
    images, _ = client.predict(**BASE, api_name="/generate")
    assert len(images) == 1


def test_on_loopback_only_loopback_names_are_answered(served):
    """DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 would drive the model (and
    read its answers) from the user's browser; its requests carry its own Host."""
    import httpx

    url = served[2].rstrip("/")
    port = url.rsplit(":", 1)[1]
    with httpx.Client(timeout=60) as http:
        for host in ("evil.example", f"evil.example:{port}", "10.0.0.1"):
            for method, path in (("GET", "/"), ("POST", "/gradio_api/call/generate")):
                r = http.request(method, f"{url}{path}", headers={"Host": host}, content=b"{}")
                assert r.status_code == 403 and "not allowed: this server answers loopback names only" in r.text and (
                    "--allowed-host NAME" in r.text), (host, path, r.status_code)
        for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
            assert http.get(f"{url}/", headers={"Host": host}).status_code == 200


def test_the_title_escapes_the_source_path(run_dir, tmp_path):
    import os

    import gradio as gr


    odd = tmp_path / "a`<img src=x onerror=alert(9)>[link](javascript:alert(1))`"
    os.symlink(run_dir, odd)
    app = _built_app(odd)
    title = next(b for b in app.blocks.values() if isinstance(b, gr.Markdown) and b.elem_id == "title").value
    assert r"a\`\<img src=x onerror=alert(9)\>\[link\](javascript:alert(1))\`" in title


@pytest.mark.slow
def test_a_cancelled_request_stops_drawing(model):
    """gradio's cancel used to leave the request in the batcher: its sampler call ran to the end
    and every later request waited behind it."""
    import threading
    import time

    from gradio_client import Client

    class Slow:  # the real model, 0.2 s per sampler step
        def __init__(self):
            self.steps_seen: list[int] = []
            self.started = threading.Event()

        def __getattr__(self, name):
            return getattr(model, name)

        def run(self, settings, jobs, callback=None):
            self.steps_seen.append(0)
            self.started.set()

            def slow(step, steps):
                time.sleep(0.2)
                self.steps_seen[-1] = step
                if callback is not None:
                    callback(step, steps)

            return model.run(settings, jobs, slow)

    slow = Slow()
    with serving(slow, window_s=0.05, max_batch=1, queue_limit=2) as (_, batcher, url):
        c = Client(url, verbose=False)
        job = c.submit(**{**BASE, "steps": 60}, api_name="/generate")  # 12 s uncancelled
        assert slow.started.wait(60)
        time.sleep(0.5)
        job.cancel()
        t0 = time.monotonic()
        images, _ = c.predict(**{**BASE, "steps": 2}, api_name="/generate")
        assert len(images) == 1 and time.monotonic() - t0 < 8
        assert slow.steps_seen[0] < 30 and slow.steps_seen[-1] == 2
        assert batcher.waiting == 0
