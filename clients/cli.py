"""``python -m clients``: list models, write a grid of generated digits, stream generated text.

Exit status: 0 on success, 1 when the server is down or refuses a request (one line on stderr),
2 for a usage error (also a value no request can carry, such as ``--seed -1``: refused before any
call), 130 when interrupted. A reader that closes the output early (``| head -1``) ends the command
quietly, with status 0: it had all it wanted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import numpy.typing as npt
from PIL import Image
from tqdm import tqdm

from clients._channel import DEFAULT_TARGET, DEFAULT_TIMEOUT
from clients._exceptions import GenserveError, InvalidRequest, Unavailable
from clients._protocol import ImageOptions, TextOptions, image_request, parse_labels, text_request
from clients._sync import Client
from clients._types import ModelInfo

PROG = "python -m clients"
PROGRESS_MIN = 256  # samples from which `images` shows a progress bar (on a terminal)
PAD = 2  # pixels between the tiles of a grid
PAD_VALUE = 128  # mid grey, so tiles stand apart from the digits' black background


def image_grid(images: npt.NDArray[np.uint8], *, cols: int | None = None, scale: int = 1) -> npt.NDArray[np.uint8]:
    """(n, h, w) samples tiled row by row into one (H, W) image, ``PAD`` grey pixels between tiles."""
    n, h, w = images.shape
    cols = min(n, cols or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + PAD) + PAD, cols * (w + PAD) + PAD), PAD_VALUE, dtype=np.uint8)
    for i, tile in enumerate(images):
        r, c = divmod(i, cols)
        grid[PAD + r * (h + PAD) : PAD + r * (h + PAD) + h, PAD + c * (w + PAD) : PAD + c * (w + PAD) + w] = tile
    return grid.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else grid


# The grid's format comes from the file name; these are the lossless and common ones Pillow writes.
IMAGE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def image_format(path: str | Path) -> str:
    """Pillow's format name for ``path``'s extension; a ValueError names the path and the extensions known."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        known = ", ".join(IMAGE_FORMATS)
        raise ValueError(f"{path}: cannot tell the image format from {suffix or 'a name without an extension'}; end it in one of {known}")
    return IMAGE_FORMATS[suffix]


def write_grid(images: npt.NDArray[np.uint8], path: str | Path, *, cols: int | None = None, scale: int = 1) -> None:
    """Write the grid in the format its extension names (``grid.png``, ``grid.jpg``, ...)."""
    Image.fromarray(image_grid(images, cols=cols, scale=scale), mode="L").save(path, format=image_format(path))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _labels(text: str) -> list[int]:
    try:
        return parse_labels(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes; the subcommands' copies keep what was given before the command."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    env_target = os.environ.get("GENSERVE_TARGET")
    g = parser.add_argument_group("connection")
    g.add_argument(
        "--target",
        action="append",
        dest="target" if defaults else "more_targets",  # argparse would replace, not extend, the list given before the command
        metavar="HOST:PORT",
        default=default(None),
        help=f"a server (a bare host: port 50051); repeat for several, served round robin "
        f"(default: $GENSERVE_TARGET or {env_target or DEFAULT_TARGET})",
    )
    g.add_argument("--timeout", type=_seconds, metavar="S", default=default(DEFAULT_TIMEOUT), help="deadline of each call in seconds")
    g.add_argument("--tls", action="store_true", default=default(False), help="connect with TLS (system roots unless --ca-cert)")
    g.add_argument("--ca-cert", metavar="PEM", default=default(None), help="trust this CA certificate (implies --tls)")
    g.add_argument("--cert", metavar="PEM", default=default(None), help="client certificate for mutual TLS (with --key; implies --tls)")
    g.add_argument("--key", metavar="PEM", default=default(None), help="the client certificate's private key")
    g.add_argument(
        "--token",
        metavar="TOKEN",
        default=default(None),
        help="bearer token sent with every call (default: $GENSERVE_TOKEN)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to a genserve server: list its models, generate digits, stream text.",
        epilog=f"Examples:\n  {PROG} models\n  {PROG} images gan -n 16 --labels 7 --out sevens.png\n"
        f'  {PROG} text transformer --prompt "ROMEO:" --max-tokens 200',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="list the served models", description="List the models the server serves.")
    models.add_argument("--json", action="store_true", help="one JSON object per model version")
    _connection_options(models, defaults=False)

    images = commands.add_parser(
        "images",
        help="generate digits into an image grid",
        description="Generate samples of an image model and write them as an image grid.",
    )
    images.add_argument("model", help="a served image model (see `models`)")
    images.add_argument("-n", type=_positive, default=16, help="samples (default 16)")
    images.add_argument("--seed", type=int, help="the same seed gives the same samples (default: drawn by the server)")
    images.add_argument(
        "--labels",
        "--label",
        type=_labels,
        action="extend",
        metavar="SPEC",
        help="conditional models: the digits to draw, e.g. 7, 0-9 or 1,3,5 (repeatable). Fewer labels than samples are "
        "cycled: -n 40 --labels 0-9 is 0-9 four times, one digit per column with --cols 10 (default: drawn from the seed)",
    )
    images.add_argument("--version", type=int, default=0, help="model version (default 0: the latest)")
    images.add_argument("--steps", type=int, help="iterative models (flow): solver steps (default: the model's, see `models`)")
    images.add_argument(
        "--guidance", type=float, help="iterative conditional models: classifier-free guidance scale, 0-20 (default: the model's)"
    )
    images.add_argument(
        "--preview-every",
        type=int,
        default=0,
        metavar="K",
        help="iterative models: show the request's progress, a preview every K steps (default 0: none)",
    )
    images.add_argument(
        "--out",
        "-o",
        default="grid.png",
        help="image file to write; its extension picks the format: .png, .jpg, .webp, ... (default grid.png)",
    )
    images.add_argument("--npy", metavar="PATH", help="also write the (n, 28, 28) uint8 samples to this .npy file")
    images.add_argument("--cols", type=_positive, help="tiles per row (default: a square grid)")
    images.add_argument("--scale", type=_positive, default=2, help="enlarge the grid by this factor (default 2)")
    _connection_options(images, defaults=False)

    text = commands.add_parser(
        "text", help="stream generated text", description="Stream the text a text model generates after a prompt, as it comes."
    )
    text.add_argument("model", help="a served text model (see `models`)")
    text.add_argument("--prompt", "-p", required=True, help='the text to continue, e.g. "ROMEO:"')
    text.add_argument("--max-tokens", type=_positive, metavar="N", help="tokens to generate (default: the server's --default-new-tokens)")
    text.add_argument("--temperature", type=float, metavar="T", help="sampling temperature; 0 is greedy (default 1.0)")
    text.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens (default: off)")
    text.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1] (default: off)")
    text.add_argument("--seed", type=int, help="the same seed gives the same text")
    text.add_argument("--stop", action="append", metavar="TEXT", help="end once this text is generated (repeatable)")
    text.add_argument("--version", type=int, default=0, help="model version (default 0: the latest)")
    text.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt first")
    _connection_options(text, defaults=False)
    return parser


def make_client(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Client:
    targets = (args.target or []) + getattr(args, "more_targets", [])
    targets = targets or [os.environ.get("GENSERVE_TARGET") or DEFAULT_TARGET]
    root = None
    if args.ca_cert:
        try:
            root = Path(args.ca_cert).read_bytes()
        except OSError as e:
            parser.error(f"--ca-cert: {e.strerror}: {args.ca_cert}")
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    pair: list[bytes | None] = [None, None]
    for i, (flag, path) in enumerate((("--cert", args.cert), ("--key", args.key))):
        if path:
            try:
                pair[i] = Path(path).read_bytes()
            except OSError as e:
                parser.error(f"{flag}: {e.strerror}: {path}")
    token = args.token or os.environ.get("GENSERVE_TOKEN") or None
    try:
        return Client(
            targets, timeout=args.timeout, tls=args.tls, root_certificates=root, token=token, client_certificate=pair[0], client_key=pair[1]
        )
    except ValueError as e:
        parser.error(f"--target: {e}")


def _describe(model: ModelInfo) -> str:
    if model.image is not None:
        i = model.image
        labels = f", labels {i.label_min}-{i.label_max}" if i.conditional else ""
        steps = f", steps {i.steps_min}-{i.steps_max} (default {i.steps_default})" if i.iterative else ""
        accepts = f"images {i.image_size}x{i.image_size}, n <= {i.max_n}{labels}{steps}"
    elif model.text is not None:
        accepts = f"text, context {model.text.context_window}, <= {model.text.max_new_tokens} new tokens"
    else:
        accepts = "?"
    latest = " (latest)" if model.latest else ""
    return f"{model.name} v{model.version}{latest}  {model.kind}  {model.parameters:,} params  {model.device}  {accepts}"


def _models(client: Client, args: argparse.Namespace, out: TextIO, received: Received) -> None:
    models = client.list_models()
    for m in models:
        print(json.dumps(asdict(m)) if args.json else _describe(m), file=out)
    if not models and not args.json:
        print("(no models)", file=out)


def _image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(
        seed=args.seed, labels=args.labels, version=args.version, steps=args.steps, guidance=args.guidance, preview_every=args.preview_every
    )


def _text_options(args: argparse.Namespace) -> TextOptions:
    return TextOptions(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or (),
        version=args.version,
    )


def _check_request(args: argparse.Namespace) -> None:
    """Build the command's request as the SDK will: a value no request can carry (``--seed -1``) raises
    InvalidRequest here, a usage error, before any call (the server's refusals come later, status 1)."""
    if args.command == "images":
        image_request(args.model, args.n, **_image_options(args))
    elif args.command == "text":
        text_request(args.model, args.prompt, **_text_options(args))


def _images(client: Client, args: argparse.Namespace, out: TextIO, received: Received) -> None:
    received.unit = "samples"
    with tqdm(total=args.n, unit="img", desc=args.model, disable=True if args.n < PROGRESS_MIN else None, file=sys.stderr) as bar:

        def progress(count: int) -> None:
            received.count += count
            bar.update(count)

        if args.preview_every:  # an iterative model's progress: one line per preview, then the samples
            images = None
            for step in client.stream_images(args.model, args.n, **_image_options(args)):
                if step.final:
                    images = step.images
                    progress(len(images))
                else:
                    print(f"{args.model}: step {step.step} ({len(step.images)} samples, preview)", file=sys.stderr)
            assert images is not None
        else:
            images = client.generate_images(args.model, args.n, progress=progress, **_image_options(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # e.g. runs/, which git ignores
    write_grid(images, args.out, cols=args.cols, scale=args.scale)
    print(f"wrote {args.out} ({len(images)} samples)", file=out)
    if args.npy:
        Path(args.npy).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.npy, images)
        print(f"wrote {args.npy} {images.shape} {images.dtype}", file=out)


def _text(client: Client, args: argparse.Namespace, out: TextIO, received: Received) -> None:
    received.unit = "characters"
    pieces = client.stream_text(args.model, args.prompt, **_text_options(args))
    wrote = False  # the prompt goes out with the first piece: a refused request prints nothing
    try:
        for piece in pieces:
            out.write(piece if wrote or args.no_echo else args.prompt + piece)
            wrote = True
            received.count += len(piece)
            out.flush()
    finally:
        if wrote:  # end the line, also before an error line when the stream breaks off
            out.write("\n")
            out.flush()


# How gRPC words a call that never reached a server (refused, unresolvable, no route), as opposed
# to an UNAVAILABLE the server sent (draining: "server is shutting down") or a connection lost mid-call
_UNREACHED = ("failed to connect", "connections to all backends failing", "dns resolution failed", "name resolution", "no route")
_CONNECTION_LOST = ("socket closed", "stream removed", "connection reset", "goaway")


@dataclass
class Received:
    """What a command got from the server before an error, so the error line can say so."""

    count: int = 0
    unit: str = ""


def _error_line(error: GenserveError, targets: Sequence[str], received: Received) -> str:
    where = ", ".join(targets)
    after = f" after {received.count} {received.unit}" if received.count else ""
    details = str(error).lower()
    if isinstance(error, Unavailable):
        if any(phrase in details for phrase in _CONNECTION_LOST):
            return f"the connection to the server at {where} closed{after or ' mid-call'}: {error}"
        if not received.count and any(phrase in details for phrase in _UNREACHED):
            return f"cannot reach the server at {where}: {error}"
        return f"the server at {where} is unavailable{after}: {error}"
    if after:
        return f"{type(error).__name__}{after}: {error}"
    return f"{type(error).__name__}: {error}"


def _reader_gone(out: TextIO) -> None:
    """The reader closed our output (``| head -1``): send what is left of it to /dev/null, so that
    neither a later write nor the flush at exit fails again (the way the Python docs give, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's capture): nothing is flushed to it at exit
        pass


def _flush(out: TextIO) -> None:
    try:
        out.flush()
    except BrokenPipeError:
        _reader_gone(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = sys.stdout
    if args.command == "images":
        try:
            image_format(args.out)  # before the request, not after the samples came
        except ValueError as e:
            parser.error(f"--out {e}")
    try:
        _check_request(args)
    except InvalidRequest as e:
        parser.error(str(e))
    client = make_client(args, parser)
    received = Received()
    try:
        with client:
            {"models": _models, "images": _images, "text": _text}[args.command](client, args, out, received)
            out.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:  # the reader stopped reading (`| head -1`): its choice, not our error, so no message and status 0
        _reader_gone(out)
        return 0
    except GenserveError as e:
        _flush(out)
        print(f"{PROG}: error: {_error_line(e, client.targets, received)}", file=sys.stderr)
        return 1
    except OSError as e:  # writing the output
        print(f"{PROG}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0
