"""`pixellm chat`: a terminal conversation about images, as the official chat.py, but multi-turn.

The loop asks for an image path ("Image path: "), then for questions about it ("Question: "). Each
answer is printed with its targets numbered ("Sure, [1]."), and its overlay and per-target masks are
written into the output folder as `<stem>_turn<k>_overlay.png` / `<stem>_turn<k>_mask_<j>.png`
(`<stem>-2_turn<k>...` when an image of that name was already talked about there, so nothing is
overwritten), the files' paths printed. The earlier questions and answers about the image are fed
to each next generation (llava_v1 multi-turn, "<image>" in the first question only; answers as
generated, codebook tokens included: `Prediction.raw_answer`); only the new answer's codebook tokens
give masks. An empty line or "/new" asks for another image; "/quit" or end of input ends the chat.
The official chat.py asks a single question per image, with no history.

`chat` reads lines from a text stream and writes to one, so tests drive it with a string; on a
terminal it reads with `input()` (line editing).
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path
from typing import TextIO

from pixellm_jax.data.sample import BadSample
from pixellm_jax.eval.predict import BadQuestion, read_image, write_prediction

IMAGE_PROMPT = "Image path: "
QUESTION_PROMPT = "Question: "
NEW, QUIT = "/new", "/quit"
HELP = (f"Give an image path, then ask about it; an empty line or {NEW} picks another image, "
        f"{QUIT} (or end of input) exits.")


class _Lines:
    """`input()`-like prompts over a pair of text streams; None at end of input."""

    def __init__(self, stdin: TextIO, stdout: TextIO):
        self.stdin, self.stdout = stdin, stdout
        self.terminal = stdin is sys.stdin and stdout is sys.stdout and stdin.isatty()

    def ask(self, prompt: str) -> str | None:
        if self.terminal:
            try:
                return input(prompt).strip()
            except EOFError:
                self.stdout.write("\n")
                return None
        self.stdout.write(prompt)
        self.stdout.flush()
        line = self.stdin.readline()
        return None if line == "" else line.strip()

    def say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()


def _unquote(text: str) -> str:
    """A path as typed or dropped into a terminal: surrounding quotes removed, "~" expanded."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return str(Path(text).expanduser())


def conversation_stem(out_dir: Path, stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... : the first with no `<name>_turn*` files in `out_dir`."""
    name, n = stem, 1
    while any(out_dir.glob(f"{glob.escape(name)}_turn*")):
        n += 1
        name = f"{stem}-{n}"
    return name


def chat(predictor, out_dir: str | Path, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
         *, seed: int = 0) -> None:
    """Run the conversation loop (module docstring) with a `Predictor` until /quit or end of input."""
    out_dir = Path(out_dir)
    lines = _Lines(stdin, stdout)
    lines.say(HELP)
    while True:
        typed = lines.ask(IMAGE_PROMPT)
        if typed is None or typed == QUIT:
            return
        if typed in ("", NEW):
            continue
        path = Path(_unquote(typed))
        if path.is_dir():
            lines.say(f"cannot use this image: {path} is a folder")
            continue
        try:
            _, image = read_image(path)
        except BadSample as e:
            lines.say(f"cannot use this image: {e.reason}")
            continue
        stem = conversation_stem(out_dir, path.stem)
        history: list[tuple[str, str]] = []
        while True:
            question = lines.ask(QUESTION_PROMPT)
            if question is None or question == QUIT:
                return
            if question in ("", NEW):
                break
            try:
                pred = predictor.predict(image, question, history=history, seed=seed)
            except BadQuestion as e:
                lines.say(str(e))
                continue
            files = write_prediction(pred._replace(image_path=Path(f"{stem}_turn{len(history) + 1}")), out_dir)
            lines.say(pred.answer)
            for k, f in enumerate(files[1:]):
                lines.say(f"  [{k + 1}] {f}")
            lines.say(f"  overlay {files[0]}")
            history.append((question, pred.raw_answer))


def chat_command(args: argparse.Namespace) -> int:
    """`pixellm chat`: load the checkpoint once, then `chat` on stdin/stdout; exit 0 (130 on Ctrl-C)."""
    from pixellm_jax.eval.generate import SamplingConfig
    from pixellm_jax.predictor import Predictor

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    predictor = Predictor.from_checkpoint(args.checkpoint, args.overrides, images_per_batch=1, rows_per_batch=1,
                                          canvas_step=args.canvas_step, sampling=sampling)
    try:
        chat(predictor, args.out, seed=args.seed)
    except KeyboardInterrupt:
        print()
        return 130
    return 0

