"""`pixellm serve`: a web demo of a checkpoint (Gradio), built on `pixellm_jax.predictor.Predictor`.

The page takes an uploaded image (or one of the `--examples` folder's) and a question, and shows the
answer with its targets numbered ("[1]", "[2]"), the overlay of `pixellm predict` (one colour and
number per target, a legend) and each target's mask as a downloadable 0/255 PNG. Decoding is greedy
unless the temperature is raised (then top-p sampling); the page's controls start at the command's
`--temperature`, `--top-p` and `--max-new-tokens`.

Compilation: the model is compiled before the server accepts requests, by a warm-up prediction on a
dummy image of the configured size with the default settings. Every question is padded to one token
length, the prompt budget (the largest of `data.token_buckets`, at most `data.model_max_length` less
the image tokens), and every image up to `--canvas-step` pixels a side shares one mask canvas, so
requests run that one program; a larger image compiles once per canvas size, and so does each new
sampling setting (temperature, top-p and max new tokens are compile-time constants of generation).
A question longer than the budget, a missing or unreadable image are reported in the page.

Requests are queued and run one at a time on the device (Gradio's queue, concurrency 1). The server
binds to 127.0.0.1 unless `--host` says otherwise (0.0.0.0: every interface), prints its URL and
stops cleanly on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pixellm_jax.errors import UserError

if TYPE_CHECKING:  # the model stack (JAX) is imported when serving, not when `pixellm` builds its parser
    from pixellm_jax.eval.generate import SamplingConfig
    from pixellm_jax.predictor import Predictor

KEPT_RESULTS = 32  # request folders of mask PNGs kept on disk (older ones are removed)
NO_IMAGE = "No image: upload one (or pick an example) first."


def add_serve_parser(sub) -> None:
    """The `pixellm serve` subcommand's arguments."""
    p = sub.add_parser("serve", help="a web demo of a checkpoint: upload an image, ask, see the numbered targets")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (params/, config.yaml, tokenizer/)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="overrides of the checkpoint's config")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all; default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--examples", help="a folder of example images offered on the page")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the page's initial value")
    p.add_argument("--temperature", type=float, default=0.0, help="the page's initial value; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="the page's initial value")
    p.add_argument("--canvas-step", type=int, default=1024,
                   help="images up to this many pixels a side share one compiled mask canvas")


class ServeError(UserError):
    """The server cannot start (examples folder, port in use, missing `gradio`)."""


class Demo:
    """What the page runs: validation, one prediction at a time, the overlay and the mask files."""

    def __init__(self, predictor: Predictor, sampling: SamplingConfig, results_dir: Path):
        self.predictor = predictor
        self.sampling = sampling
        self.results_dir = results_dir
        cfg = predictor.loaded.config
        n_img = cfg.model.projector.llm_grid ** 2
        # Generation compiles per token length; a prompt past the largest bucket would compile a new
        # length the model was not trained on, so the budget is that bucket (and model_max_length).
        self.max_prompt_tokens = min(max(cfg.data.token_buckets), cfg.data.model_max_length - (n_img - 1))
        predictor.shape = dataclasses.replace(predictor.shape, token_buckets=(self.max_prompt_tokens,))
        self._lock = threading.Lock()
        self._requests = 0

    def prompt_tokens(self, question: str) -> int:
        from pixellm_jax.data.conversation import tokenize_generation
        from pixellm_jax.data.sample import IMAGE_PLACEHOLDER

        cfg = self.predictor.loaded.config
        return len(tokenize_generation(self.predictor.loaded.legacy, f"{IMAGE_PLACEHOLDER}\n{question}",
                                       use_im_start_end=cfg.data.use_im_start_end))

    def check_question(self, question: str) -> str | None:
        """Why `question` cannot be asked, or None."""
        if not question.strip():
            return "No question: type one first."
        n = self.prompt_tokens(question)
        if n > self.max_prompt_tokens:
            return (f"The question is too long: its prompt is {n} tokens, this model takes at most "
                    f"{self.max_prompt_tokens} (data.token_buckets / data.model_max_length). Shorten it.")
        return None

    def sampling_for(self, temperature: float, top_p: float, max_new_tokens: int) -> SamplingConfig:
        """The page's settings; greedy ignores top-p (so it does not compile a program per top-p)."""
        from pixellm_jax.eval.generate import SamplingConfig

        temperature = max(float(temperature), 0.0)
        top_p = min(max(float(top_p), 1e-3), 1.0) if temperature > 0 else 1.0
        return SamplingConfig(max_new_tokens=max(int(max_new_tokens), 1), temperature=temperature, top_p=top_p)

    def warm_up(self) -> float:
        """Compile the generation program with a dummy image of the configured size; seconds taken."""
        size = self.predictor.loaded.config.model.vision.image_size
        start = time.perf_counter()
        with self._lock:
            self.predictor.sampling = self.sampling
            self.predictor.predict(np.zeros((size, size, 3), np.uint8), "What is in the image?")
        return time.perf_counter() - start

    def answer(self, image: str | None, question: str, temperature: float, top_p: float, max_new_tokens: int,
               seed: int = 0):
        """(answer, overlay, mask files, status) for the page; a bad input leaves only the status."""
        from pixellm_jax.overlay import overlay
        from pixellm_jax.predictor import UnusableImage

        if image is None:
            return "", None, None, NO_IMAGE
        problem = self.check_question(question or "")
        if problem:
            return "", None, None, problem
        sampling = self.sampling_for(temperature, top_p, max_new_tokens)
        start = time.perf_counter()
        try:
            with self._lock:  # the queue runs one request at a time; this also guards direct callers
                self.predictor.sampling = sampling
                result = self.predictor.predict(image, question.strip(), seed=int(seed or 0))
        except UnusableImage as e:
            return "", None, None, f"Unreadable image: {_without_folder(str(e), image)}"
        files = self._write_masks(Path(image).stem, result.masks)
        took = time.perf_counter() - start
        targets = len(result.masks)
        status = f"{targets} target{'s' * (targets != 1)} in {took:.1f} s."
        return result.answer, overlay(result.image, result.masks), files or None, status

    def _write_masks(self, stem: str, masks: np.ndarray) -> list[str]:
        with self._lock:
            self._requests += 1
            folder = self.results_dir / f"{self._requests:06d}"
        folder.mkdir(parents=True)
        files = []
        for k, mask in enumerate(masks):
            files.append(str(folder / f"{stem}_mask_{k + 1}.png"))
            Image.fromarray(mask.astype(np.uint8) * 255).save(files[-1])
        for old in sorted(self.results_dir.iterdir())[:-KEPT_RESULTS]:  # Gradio serves copies of returned files
            shutil.rmtree(old, ignore_errors=True)
        return files


def _without_folder(message: str, path: str) -> str:
    """A message about an uploaded file, naming it without Gradio's cache folder."""
    return message.replace(str(Path(path).parent) + os.sep, "")


def _report_unreadable(image):
    """`image` (a gr.Image) with an unreadable upload reported as such: the stock preprocessing fails with
    a developer's message. (Patched on the instance: a gr.Image subclass makes Gradio write a .pyi stub
    next to this module.)"""
    import gradio as gr

    stock = image.preprocess

    def preprocess(payload):
        try:
            return stock(payload)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - any decoding failure is the upload's fault
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"Unreadable image: {name} cannot be read as an image ({e.__class__.__name__}).") from None

    image.preprocess = preprocess
    return image


def build_page(demo: Demo, title: str, examples: list[Path]):
    """The Gradio page (not launched)."""
    import gradio as gr

    s = demo.sampling
    with gr.Blocks(title=f"PixelLM: {title}", analytics_enabled=False) as page:
        gr.Markdown(f"## PixelLM &middot; {title}\nUpload an image, ask for the targets (\"Segment the cat and "
                    "the dog.\"): each one is numbered in the answer and on the overlay.")
        with gr.Row():
            with gr.Column():
                image = _report_unreadable(gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                                    height=420, elem_id="image"))
                question = gr.Textbox(label="Question", lines=2, elem_id="question",
                                      placeholder="Segment the cat and the dog.")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 2.0, value=s.temperature, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=s.top_p, step=0.05, label="Top-p (when sampling)")
                    max_new = gr.Slider(1, max(2048, s.max_new_tokens), value=s.max_new_tokens, step=1,
                                        label="Max new tokens")
                    seed = gr.Number(0, precision=0, label="Seed (when sampling)")
                    gr.Markdown("Each new setting compiles the model once (the first answer with it is slower).")
                submit = gr.Button("Ask", variant="primary", elem_id="submit")
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                shown = gr.Image(label="Targets", type="pil", format="png", interactive=False, height=420,
                                 buttons=["download", "fullscreen"], elem_id="overlay")
                masks = gr.File(label="Masks (PNG, 0/255)", file_count="multiple", interactive=False,
                                elem_id="masks")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[image], label="Examples", cache_examples=False)
        inputs = [image, question, temperature, top_p, max_new, seed]
        for event in (submit.click, question.submit):
            event(demo.answer, inputs, [answer, shown, masks, status], concurrency_limit=1)
    return page.queue(default_concurrency_limit=1)


def serve(args: argparse.Namespace) -> int:
    """Load, compile, serve until Ctrl-C / SIGTERM (exit 0); interrupted while starting: exit 130."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports (read when gradio is imported)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ServeError("pixellm serve needs Gradio: pip install 'pixellm-jax[serve]'") from None
    from pixellm_jax.eval.generate import SamplingConfig
    from pixellm_jax.eval.predict import image_files
    from pixellm_jax.predictor import Predictor

    examples = image_files(Path(args.examples).absolute()) if args.examples else []
    _check_port(args.host, args.port)  # before minutes of loading and compiling
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    checkpoint = Path(args.checkpoint)
    results = Path(tempfile.mkdtemp(prefix="pixellm-serve-"))
    page = None
    stops = (signal.SIGINT, signal.SIGTERM)
    # SIGTERM stops it as Ctrl-C does; both even in the background of a script (where Ctrl-C is ignored)
    handlers = {sig: signal.signal(sig, _interrupt) for sig in stops}
    try:
        _log(f"loading {checkpoint}")
        predictor = Predictor.from_checkpoint(checkpoint, args.overrides, images_per_batch=1, rows_per_batch=1,
                                              canvas_step=args.canvas_step)
        demo = Demo(predictor, sampling, results)
        _log("compiling (a warm-up prediction on a dummy image)")
        _log(f"compiled in {demo.warm_up():.1f} s")
        page = build_page(demo, checkpoint.name, examples)
        try:
            page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                        share=False, show_error=True, ssr_mode=False, mcp_server=False,
                        allowed_paths=[str(results), *{str(p.parent) for p in examples}])
        except OSError:
            raise ServeError(f"cannot listen on {args.host}:{args.port} (in use? pass another --port)") from None
        host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        print(f"pixellm serve: running on http://{host}:{page.server_port} (Ctrl-C to stop)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        if page is None:  # while loading or compiling: JAX may be left mid-trace, which can hang its shutdown
            _log("interrupted")
            shutil.rmtree(results, ignore_errors=True)
            sys.stdout.flush()
            os._exit(130)
        _log("stopped")
        return 0
    finally:
        for sig in stops:  # a second Ctrl-C does not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        if page is not None:
            page.close()
        shutil.rmtree(results, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e} (pass another --host / --port)") from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _log(message: str) -> None:
    print(f"pixellm serve: {message}", file=sys.stderr, flush=True)
