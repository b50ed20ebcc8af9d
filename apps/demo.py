"""The Gradio app: ``minfm demo SRC`` serves a text-to-image (or text-to-video) page and a ``/generate`` API.

    minfm demo experiments/quickstart                 # http://127.0.0.1:7860
    minfm demo hf://org/model --max-batch 16 --port 8000

Every request goes through one :class:`~minfm_apps.batcher.Batcher`, so requests that
arrive together are drawn in one packed sampler call even at different sizes. The
same function serves the page and the API (``gradio_client``: ``api_name="/generate"``).
A video model's page adds a frame count and plays each clip as an MP4.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass

# Before gradio is imported: a demo server must not phone home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from minfm_core.cli.argtypes import host_allowed, host_name, is_loopback, listen_family  # noqa: E402
from minfm_core.errors import MinfmError  # noqa: E402

from .batcher import Batcher, QueueFull  # noqa: E402
from .model import DemoModel, size_label  # noqa: E402
from .numbers import NUMBERS  # noqa: E402

_POLL_S = 0.1  # how often a waiting request refreshes its progress bar
#: The largest request body the server reads. A request is a few KB of JSON (prompts are at
#: most a few thousand characters); anything bigger is refused with 413 before gradio reads it.
MAX_BODY_BYTES = 1 << 20
# gradio's file-taking routes: this app takes no uploads, so they answer 403.
_UPLOAD_ROUTES = ("/upload", "/process_recording")
# Paths and names hold underscores and stars: escape them so markdown shows them as typed.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|])")


def card_markdown(model: DemoModel) -> str:
    return "\n".join(f"- **{k}**: {_md_escape(str(v))}" for k, v in model.card())


def _md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


@dataclass
class HostCheck:
    """Whether the server answers loopback Host names (and ``allowed``) only. On for a server on
    loopback; off while a share link is being made (the tunnel forwards the link's own name)
    and after, if one was made."""

    on: bool
    allowed: tuple[str, ...] = ()


class GuardRequests:
    """ASGI middleware in front of gradio's routes: refuses the upload routes (403) and any request
    body over ``max_body`` bytes (413), counting the bytes as they arrive (a chunked body has no
    Content-Length), so a huge body is never held whole in memory. With ``hosts.on``, a request
    whose Host is not a loopback name is refused (403), HTTP and websocket alike: a page
    elsewhere re-pointed at 127.0.0.1 (DNS rebinding) would otherwise drive the model from the
    user's browser."""

    def __init__(self, app, hosts: HostCheck, max_body: int = MAX_BODY_BYTES, arity: dict[int, int] | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.hosts = hosts
        self.arity = arity  # fn_index -> its number of inputs (see _call_problem)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if self.hosts.on:
            host = dict(scope.get("headers") or ()).get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.hosts.allowed):
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                return await _answer(send, 403, f"Host {host_name(host)!r} not allowed: this server answers loopback "
                                                "names only (minfm demo --allowed-host NAME adds one).")
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path", "").rstrip("/").endswith(_UPLOAD_ROUTES):
            return await _answer(send, 403, "This demo takes no uploads.")
        too_big = f"Request body too large: this demo takes at most {self.max_body} bytes."
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body):
            return await _answer(send, 413, too_big)
        # Read the (small) body here, then hand it to gradio in one piece.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _answer(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if self.arity is not None and (problem := _call_problem(scope, b"".join(chunks), self.arity)):
            return await _answer(send, *problem)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later reads: to see a disconnect

        return await self.app(scope, replay, send)


def _call_problem(scope, body: bytes, arity: dict[int, int]) -> tuple[int, str] | None:
    """(status, text) for a call of an event (``/queue/join``, ``/run/predict``) that names no
    event of this app or gives it the wrong number of inputs: gradio answered those with an
    empty error or a 500, and a traceback in the server's log for each (anyone who reaches
    the server could fill its log). None for anything else, which gradio handles."""
    import json

    if scope.get("method") != "POST" or not scope.get("path", "").rstrip("/").endswith(("/queue/join", "/run/predict")):
        return None
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: gradio's own 4xx
    if not isinstance(call, dict) or "fn_index" not in call:
        return 404, "No such event: give fn_index (gradio_client does)."
    index, data = call.get("fn_index"), call.get("data")
    if type(index) is not int or index not in arity:
        return 404, f"No such event: fn_index {str(index)[:20]}."
    if not isinstance(data, list) or len(data) != arity[index]:
        got = f"{len(data)}" if isinstance(data, list) else "no list"
        return 422, f"This event takes {arity[index]} inputs, got {got}."
    return None


async def _answer(send, status: int, text: str) -> None:
    body = text.encode() + b"\n"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _event_alive():
    """A callable saying whether the gradio event being handled still has a listener: a browser
    that closes its tab (or a client that drops its stream) does not cancel the handler, gradio
    only marks its event dead. Always true outside a gradio event."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return lambda: True

    def alive() -> bool:
        for job in list(getattr(queue, "active_jobs", ()) or ()):
            for event in job or ():
                if getattr(event, "_id", None) == event_id:
                    return getattr(event, "alive", True)
        return True

    return alive


def make_handler(model: DemoModel, batcher: Batcher, cache_dir: str | None = None):
    """The request function behind the page and ``/generate``.

    An image model's returns (captioned images, the seed used); a video model's takes a frame
    count too and returns (the first clip's MP4, every clip's MP4 captioned, the seed used).
    MP4s go into Gradio's cache (``cache_dir``) under content-hashed names, like its images.
    """

    async def draw(prompt, negative_prompt, size, steps, cfg_scale, ep_cfg, sampler, seed, random_seed, num_images,
                   frames, progress):
        if not isinstance(random_seed, bool):  # "yes" or "false" from an API caller: both truthy
            raise _refusal(f"Random seed must be true or false, got {str(random_seed)[:40]!r}.", "Invalid input")
        if random_seed:
            seed = secrets.randbelow(2**31 - model.limits.max_images)
        try:
            settings, jobs = model.check_request(prompt, negative_prompt, size, steps, cfg_scale, ep_cfg,
                                                 sampler, seed, num_images, frames)
        except MinfmError as exc:
            raise _refusal(str(exc), "Invalid input") from None
        try:
            req = batcher.submit(jobs, settings)
        except QueueFull:
            raise _refusal("The demo is busy: too many requests are waiting. Try again shortly.") from None
        # The handler is a coroutine so that gradio's cancel (the page's Stop, a client's cancel)
        # reaches it; a dropped listener is seen by polling. Either way the request's future is
        # cancelled, and the batcher drops its work.
        alive = _event_alive()
        done = asyncio.wrap_future(req.future)
        try:
            progress(0, desc="waiting for the batch")
            while not (await asyncio.wait({done}, timeout=_POLL_S))[0]:
                if not alive():
                    req.future.cancel()
                    raise _refusal("The request was dropped: nobody is waiting for it.")
                if req.steps:
                    progress((req.step, req.steps), desc="sampling", unit="steps")
            try:
                return done.result(), jobs
            except MinfmError as exc:  # (out of memory, a sampler's own refusal): the page says it; no traceback
                print(f"minfm demo: request failed: {exc}", flush=True)
                raise _refusal(str(exc)) from None
        finally:
            req.future.cancel()  # a no-op once it has its result

    if not model.makes_clips:
        async def generate(prompt: str, negative_prompt: str, size: str, steps: float, cfg_scale: float, ep_cfg: bool,
                           sampler: str, seed: float, random_seed: bool, num_images: float, progress=gr.Progress()):
            images, jobs = await draw(prompt, negative_prompt, size, steps, cfg_scale, ep_cfg, sampler, seed, random_seed,
                                num_images, 1, progress)
            out = [(img, f"seed {job.seed} · {size_label(*job.size[1:])}") for img, job in zip(images, jobs)]
            return out, jobs[0].seed

        return generate

    from gradio.processing_utils import save_bytes_to_cache

    from minfm_core.engine.video_io import DEFAULT_FPS, encode_mp4

    def encode(clips, jobs):
        paths = []
        for clip, job in zip(clips, jobs):
            arr = np.asarray(clip)[None] if isinstance(clip, Image.Image) else clip  # a 1-frame request
            paths.append(save_bytes_to_cache(encode_mp4(arr, DEFAULT_FPS), f"seed{job.seed}.mp4", cache_dir))
        return paths

    async def generate_clips(prompt: str, negative_prompt: str, size: str, frames: float, steps: float,
                             cfg_scale: float, ep_cfg: bool, sampler: str, seed: float, random_seed: bool,
                             num_images: float, progress=gr.Progress()):
        clips, jobs = await draw(prompt, negative_prompt, size, steps, cfg_scale, ep_cfg, sampler, seed, random_seed,
                                 num_images, frames, progress)
        progress(1.0, desc="encoding")
        paths = await asyncio.to_thread(encode, clips, jobs)  # off the event loop
        out = [(p, f"seed {job.seed} · {job.size[0]} frames · {size_label(*job.size[1:])}") for p, job in zip(paths, jobs)]
        return paths[0], out, jobs[0].seed

    return generate_clips


def _refusal(message: str, title: str = "Error") -> gr.Error:
    """The error a request gets: its text is HTML-escaped, because the page's toast renders HTML
    and the message may quote what the caller typed (a prompt, a size, a sampler name); logged
    without a traceback (it is the caller's to fix)."""
    return gr.Error(html.escape(message, quote=False), title=title, print_exception=False)


def batcher_queue_limit(queue_limit: int, max_batch: int) -> int:
    """How many requests may wait in the batcher: gradio runs up to ``max_batch`` handlers at once,
    each waiting on one request, and queues ``queue_limit`` more; the batcher holds no more than
    both together, whatever happens to gradio's own count (a cancelled request's work is dropped)."""
    return queue_limit + max_batch


def build_app(model: DemoModel, batcher: Batcher, *, queue_limit: int = 32) -> gr.Blocks:
    lim = model.limits
    examples = model.examples
    clips = model.makes_clips
    task = "text-to-video" if clips else "text-to-image"
    # Generated images and clips live in gradio's cache; drop those older than an hour, hourly.
    with gr.Blocks(title=f"minFM {task}", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## minFM {task}\n{_md_escape(model.source)}", elem_id="title")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = _text_only(gr.Textbox(label="Prompt", lines=2, max_length=lim.max_prompt_chars, elem_id="prompt",
                                               placeholder=examples[0] if examples else "describe an image"))
                negative = _text_only(gr.Textbox(label="Negative prompt", value=model.default_neg_prompt,
                                                 max_length=lim.max_prompt_chars, elem_id="negative-prompt"))
                with gr.Row():
                    size = gr.Dropdown([size_label(*s) for s in model.presets], value=size_label(*model.default_size),
                                       allow_custom_value=True, label="Size (height x width)", elem_id="size",
                                       info=f"a preset, or HxW in multiples of {lim.multiple}")
                    num_images = _slider(1, lim.max_images, value=min(2, lim.max_images), step=1,
                                         label="Clips" if clips else "Images")
                frames = None
                if clips:  # only a video model is offered a frame count (and only counts it can cut)
                    frames = _slider(model.min_frames, lim.max_frames, value=model.default_frames,
                                     step=model.frame_step, label="Frames", elem_id="frames",
                                     info=f"clips play at 8 fps; counts this model can draw: {model.frame_choices()}")
                with gr.Row():
                    steps = _slider(1, lim.max_steps, value=model.default_steps, step=1, label="Steps")
                    cfg_scale = _quiet_bounds(gr.Slider(0.0, lim.max_cfg, value=model.default_cfg, step=0.1,
                                                        label="CFG scale"))
                with gr.Row():
                    sampler = _quiet_bounds(gr.Dropdown(model.samplers(), value=model.default_sampler, label="Sampler"))
                    ep_cfg = gr.Checkbox(value=model.default_ep_cfg, label="EP-CFG (energy-preserving guidance)")
                with gr.Row():
                    # precision None: a seed of 1.5 reaches check_request (and is refused) instead of
                    # being rounded to 2 by gradio; the highest seed a request may start at depends on
                    # its image count, so check_request bounds it, not the box
                    seed = _quiet_bounds(gr.Number(value=0, minimum=0, maximum=2**31 - 1, label="Seed"))
                    random_seed = gr.Checkbox(value=True, label="Random seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[prompt], label="Prompts from the training recipe")
            with gr.Column(scale=3):
                video = None
                if clips:
                    video = gr.Video(label="Clip", format="mp4", autoplay=True, loop=True, interactive=False,
                                     height=320, elem_id="video")
                gallery = gr.Gallery(label="Clips" if clips else "Images", format="png", columns=2,
                                     object_fit="contain", height=420 if not clips else 240,
                                     buttons=["download", "fullscreen"], interactive=False, elem_id="gallery")
                seed_used = gr.Number(label="Seed used", info="image i of a request uses seed + i", precision=0,
                                      interactive=False, elem_id="seed-used")
                with gr.Accordion("Model card", open=True):
                    gr.Markdown(card_markdown(model), elem_id="model-card")
                    with gr.Accordion("Recipe", open=False):
                        gr.Code(model.recipe_text, language=None, interactive=False, label="recipe.toml")
        inputs = [prompt, negative, size, steps, cfg_scale, ep_cfg, sampler, seed, random_seed, num_images]
        outputs = [gallery, seed_used]
        if clips:
            inputs.insert(3, frames)
            outputs.insert(0, video)
        gr.on(
            triggers=[button.click, prompt.submit],
            fn=make_handler(model, batcher, cache_dir=gallery.GRADIO_CACHE),
            inputs=inputs,
            outputs=outputs,
            api_name="generate",
        )
    # Handlers only wait on the batcher, so as many may run as one batch can hold. api_open=False:
    # gradio's direct REST route (/gradio_api/run/generate) skipped the queue, its size limit
    # and the cancel on disconnect; every caller now joins the queue (gradio_client does).
    app.queue(max_size=queue_limit, default_concurrency_limit=batcher.max_batch, api_open=False)
    return app


def _text_only(box):
    """``box``, a textbox that refuses what an API caller sends that is no text: gradio's own
    preprocess made ``str()`` of it, so ``prompt=12345`` or ``["a", 5]`` was drawn as a prompt
    (and check_request's type check never saw it)."""
    preprocess = box.preprocess

    def strict(payload):
        if payload is not None and not isinstance(payload, str):
            raise _refusal(f"{box.label} must be text, got {type(payload).__name__}.")
        return preprocess(payload)

    box.preprocess = strict
    return box


def _quiet_bounds(component):
    """``component``, whose own input check leaves a value it refuses to ``check_request``,
    which refuses it by the input's name and range (``Steps must be between 1 and 20, got
    0.``): gradio's own refusal named neither (``Value 0 is less than minimum value 1.``, the
    same for steps and images), printed a traceback in the server log and showed the caller's
    text as HTML; a value that is no number at all (``"3"``, null) made its range check fail
    with a TypeError (an empty error and a traceback). (Wrapped on the instance: a subclass of
    a gradio component writes a ``.pyi`` file beside its module at import.)"""
    preprocess = component.preprocess

    def quiet(payload):
        try:
            return preprocess(payload)
        except (gr.Error, TypeError, ValueError):
            return payload

    component.preprocess = quiet
    return component


def _slider(lo: float, hi: float, **kwargs):
    """``gr.Slider(lo, hi)``, or a fixed number where only one value is allowed (gradio refuses a
    slider whose ends meet: ``--max-batch 1`` or ``--max-steps 1`` ended the demo at start)."""
    if hi > lo:
        return _quiet_bounds(gr.Slider(lo, hi, **kwargs))
    kwargs.pop("step", None)
    return _quiet_bounds(gr.Number(minimum=lo, maximum=lo, precision=0, interactive=False, **kwargs))


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True, allowed_hosts: tuple[str, ...] = ()):
    """Start the server; returns gradio's (app, local_url, share_url)."""
    hosts = HostCheck(on=is_loopback(host) and not share, allowed=tuple(allowed_hosts))
    started = app.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block, ssr_mode=False,
        max_file_size="1mb",  # the app takes no uploads (GuardRequests refuses gradio's upload route)
        # quiet: its banner advises "set `share=True` in `launch()`"; serve prints the URLs itself
        quiet=True, show_error=False,
        app_kwargs={"middleware": [Middleware(GuardRequests, hosts=hosts,
                                              arity={i: len(fn.inputs) for i, fn in app.fns.items()})]},
    )
    hosts.on = is_loopback(host) and not started[2]  # --share that made no link: still loopback only
    return started


_CALLS = logging.StreamHandler(sys.stderr)
_CALLS.setFormatter(logging.Formatter("minfm demo: %(message)s"))


def _log_calls() -> None:
    """The batcher's line per sampler call ("sampler call 3: 2 requests, 5 images in 1.20 s",
    docs/demo.md) on the server's stderr: Python's default shows warnings only."""
    log = logging.getLogger("minfm_apps.batcher")
    if _CALLS not in log.handlers:
        log.addHandler(_CALLS)
    log.setLevel(logging.INFO)
    log.propagate = False  # a host application's root handler would print it twice


def serve(src: str, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, queue_limit: int = 32,
          max_batch: int = 8, window_ms: float = 100.0, use_ema: bool = True, max_steps: int = 100,
          allowed_hosts: tuple[str, ...] = ()) -> int:
    """``minfm demo``: load the model once, then serve until interrupted."""
    for flag, value in (("--queue-limit", queue_limit), ("--max-batch", max_batch), ("--batch-window-ms", window_ms),
                        ("--max-steps", max_steps), ("--port", port)):
        if value is not None:  # the CLI's own parsers: one range per number
            NUMBERS[flag](repr(value) if isinstance(value, float) else str(value))
    listen_family(host, port)  # a busy port is one line now, not gradio's advice after the model loaded
    model = DemoModel.load(src, use_ema=use_ema, max_images=min(max_batch, 8), max_steps=max_steps)
    if model.makes_clips:
        from minfm_core.engine.video_io import require_av

        require_av()  # a video model answers with MP4s: refuse to start rather than fail every request
    print(f"minfm demo: {model.source}: {model.n_params:,} parameters, {model.weights_label}, on {model.pipe.device}")
    if not is_loopback(host):
        print(f"minfm demo: warning: listening on {host}: other machines can reach this server", file=sys.stderr)
    if share:
        print("minfm demo: warning: --share opens a public link: anyone with it can use this model", file=sys.stderr)
    _log_calls()
    # Gradio serves every file below its cache, by default the machine's shared /tmp/gradio:
    # other programs' files (and earlier demos' images) were served too. A folder of this
    # server's own (0700), removed when it stops; a GRADIO_TEMP_DIR the user set is theirs.
    own_cache = None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        own_cache = os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="minfm-demo-")
    batcher = Batcher(lambda settings, jobs, cb: model.run(settings, jobs, cb), window_s=window_ms / 1000.0,
                      max_batch=max_batch, max_queue=batcher_queue_limit(queue_limit, max_batch))
    app = build_app(model, batcher, queue_limit=queue_limit)
    _, local_url, share_url = launch(app, host=host, port=port, share=share, block=False, allowed_hosts=allowed_hosts)
    print(f"minfm demo: serving on {local_url}" + ("" if share else " (--share opens a public link too)"))
    if share_url:
        print(f"minfm demo: public link {share_url}")
    elif share:
        print("minfm demo: warning: --share made no public link (gradio's reason above)", file=sys.stderr)
    code = _wait_for_a_stop_signal()
    # Gradio's own shutdown can wait on open client connections; give it a few seconds,
    # then leave: nothing is left to save, and its server threads must not keep us alive.
    closer = threading.Thread(target=app.close, daemon=True)
    closer.start()
    closer.join(5.0)
    batcher.close(timeout=5.0)
    if own_cache is not None:
        shutil.rmtree(own_cache, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait_for_a_stop_signal() -> int:
    """Block until Ctrl-C or SIGTERM; the exit code it asks for (130 or 143, as every minfm
    command). Both stop the server even when the parent started us with SIGINT ignored (as a
    non-interactive shell does for background jobs). A second signal during the shutdown
    leaves at once: raised as KeyboardInterrupt inside gradio's closing threads, it aborted
    the interpreter (SIGABRT, exit 134)."""
    stop = threading.Event()
    code = 0

    def on_signal(signum, _frame) -> None:
        nonlocal code
        if stop.is_set():
            os._exit(code)
        code = 128 + signum
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # said once the handlers are in place: a signal sent on reading it is one of ours (before
    # them, a SIGTERM ended the command at once, and a second one killed it during its exit)
    print("minfm demo: Ctrl-C stops it", file=sys.stderr)
    stop.wait()
    print("minfm: interrupted" if code == 128 + signal.SIGINT else "minfm: terminated (SIGTERM)", file=sys.stderr)
    return code
