"""Command line: `vggfast SUBCOMMAND ...` (also `python -m vggfast`).

User errors print one line on stderr and exit with code 2 (errors.PARTIAL); no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import sys
import time
import warnings
from importlib import resources
from pathlib import Path

from . import distributed
from .errors import OUT_OF_MEMORY_ADVICE, PARTIAL, ArgumentError, OutOfMemoryError, VGGFastError, \
    allocator_failure

# Modules that add their own subcommands through `add_cli(subparsers)`.
_COMMAND_MODULES: tuple[str, ...] = ("vggfast.train", "vggfast.features", "vggfast.protocols",
                                     "vggfast.localize")
SAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _weights_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--weights", "-w", required=required,
                   default=None if required else os.environ.get("VGGFAST_WEIGHTS"),
                   help="weights: a file, a torchvision name in the hub cache (vgg16), or a "
                        "`vggfast train` folder (default: $VGGFAST_WEIGHTS)")
    p.add_argument("--config", default=None, help="A A-LRN B C D E or vgg11..vgg19_bn "
                                                   "(default: detected from the weights)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bfloat16 "
                                                 "on cuda, float32 on cpu)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                   help="auto (default): triton on cuda, torch otherwise")
    p.add_argument("--preprocess", default=None, choices=("torchvision", "caffe", "caffe-rgb",
                                                            "vggface", "vggface-bgr"),
                   help="input convention (default: from the weights, else torchvision)")


def _engine(args, weights):
    from .engine import Engine
    return Engine(weights, config=args.config, device=args.device, dtype=args.dtype,
                  backend=args.backend, preprocess=args.preprocess)


class OneLineParser(argparse.ArgumentParser):
    """argparse with the CLI's error format: a usage error is one line on stderr (naming
    `--help`) and exit code PARTIAL (2), not argparse's usage block."""

    def error(self, message: str):
        message = (message.replace("\r", "\\r").replace("\n", "\\n") +
                   _misplaced_hint(message, self))
        self.exit(PARTIAL, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _misplaced_hint(message: str, parser: argparse.ArgumentParser) -> str:
    """What to do when an option that takes a list (`--scales Q [Q ...]`, evaluate's
    `--method M [M ...]`) swallowed the image or folder that followed it: `vggfast classify -w W
    --scales 256 photo.jpg` reads photo.jpg as a scale, and argparse's "invalid int value:
    'photo.jpg'" alone does not say why."""
    m = re.match(r"argument (--[\w-]+)(?:/-\w+)?: invalid (int value|choice): '(.*?)'", message)
    action = parser._option_string_actions.get(m[1]) if m else None
    if action is None or action.nargs not in ("+", "*"):
        return ""        # a one-value option: the value typed is wrong, not misplaced
    value = m[3]
    # a path: "-", an existing file, or a name with a folder or a suffix (not 1.5e3)
    if not (value == "-" or os.path.exists(value) or re.search(r"[/\\]|\.[A-Za-z]\w*$", value)):
        return ""
    example = "256 384" if m[2] == "int value" else next(iter(action.choices or ()), "...")
    return (f"; {value} is a path, not one of {m[1]}'s values: put the images or folders "
            f"before {m[1]}, or end its values with -- (e.g. {m[1]} {example} -- {value})")


class OutputError(VGGFastError):
    """Standard output could not be written (a full disk, /dev/full, an I/O error)."""


class _GuardedStdout:
    """sys.stdout while a command runs: a failed write or flush of the results is an OutputError
    (one line, exit 2), told apart from an OSError of any other file, which stays a traceback.
    BrokenPipeError (the reader left, `| head`) passes through as it is."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write to standard output: {exc.strerror or exc}") from exc

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null so that the interpreter's last flush of what is still
    buffered does not fail again and print an "Exception ignored" report after the error line."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def error_line(exc: BaseException) -> str:
    """`vggfast: error: MESSAGE` on one line, even when the message quotes a file name that holds
    a line break."""
    text = str(exc).replace("\r", "\\r").replace("\n", "\\n")
    return f"vggfast: error: {text}"


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def shown_name(path) -> str:
    """A file name as a line of plain-text output shows it: as it is, or, when it holds a line
    break, a tab or another control character (all legal in a Linux file name), quoted and
    escaped as Python's repr writes it (`ls` quotes such names too), so that `b\\n  0.9  3 cat.jpg`
    cannot print as a name line followed by a result line."""
    text = str(path)
    # control characters only: a name that is not UTF-8 (lone surrogates) is _printable_stdout's
    return repr(text) if _CONTROL.search(text) else text


def _need_weights(args) -> str:
    if not args.weights:
        raise VGGFastError("no weights given: pass --weights PATH_OR_NAME or set VGGFAST_WEIGHTS")
    return args.weights


def _print_results(named, results, k: int, as_json: bool, stats: dict | None = None) -> None:
    if as_json:
        rows = [{"image": str(n), **r.to_dict(k)} for n, r in zip(named, results)]
        print(json.dumps({"results": rows, **(stats or {})}, indent=2))
        return
    for n, r in zip(named, results):
        print(shown_name(n))
        for i, name, p in r.top(k):
            print(f"  {p:7.4f}  {i:4d}  {name}")


# What errors call the image `-` reads: its decode errors, and a refusal of the decoded
# image (over the memory budget), which would say "-" or "image 0"
STDIN_NAME = "standard input"


def _stdin_image():
    """`-`: an image file's bytes on standard input, named as such in its errors (not
    "<bytes>")."""
    from .errors import ImageError
    from .preprocess import load_image
    with contextlib.suppress(AttributeError, ValueError, OSError):
        if sys.stdin.isatty():   # `vggfast classify -` typed alone would wait for bytes forever
            raise ImageError(f"{STDIN_NAME} is a terminal, not an image file; pipe one into `-`, "
                             "e.g. cat photo.jpg | vggfast classify - (or heatmap -)")
    data = sys.stdin.buffer.read()
    if not data:
        raise ImageError(f"{STDIN_NAME} is empty; pipe an image file into `-`, e.g. "
                         "cat photo.jpg | vggfast classify - (or heatmap -)")
    try:
        return load_image(data)
    except ImageError as exc:
        raise ImageError(f"{STDIN_NAME}: {str(exc).removeprefix('<bytes>: ')}") from None


def cmd_classify(args) -> int:
    from .errors import ImageError
    from .preprocess import load_image
    from .engine import CHUNK_IMAGES, skipping_oversized
    from .protocols import list_images, no_images_note
    if args.images.count("-") > 1:   # the second would read an emptied stdin
        raise ArgumentError("- is given more than once; standard input holds one image file")
    paths = []
    for path in args.images:     # a folder stands for its image files (recursive, sorted)
        inside = list_images(Path(path)) if path != "-" and os.path.isdir(path) else [path]
        if not inside:
            raise ArgumentError(f"{path} is a folder without image files"
                                f"{no_images_note(Path(path))}")
        paths += [str(p) for p in inside]
    eng = _engine(args, _need_weights(args))
    scales = eng.check_scales(args.scales, method=args.method)
    flip = not args.no_flip
    names, results, failed = [], [], 0
    for start in range(0, len(paths), CHUNK_IMAGES):
        # a chunk of photos decoded at a time (each one a request), not every photo at once
        images, decoded = [], []
        for path in paths[start:start + CHUNK_IMAGES]:
            try:
                images.append(_stdin_image() if path == "-" else load_image(path))
                decoded.append(path)
            except ImageError as exc:
                print(error_line(exc), file=sys.stderr)
                failed += 1
        # a photo over the memory budget (a panorama) is skipped by name, not the chunk
        outs, kept, over = skipping_oversized(
            lambda ims: eng.classify(ims, scales=scales, flip=flip, method=args.method,
                                     top_k=args.top), images)
        for j, why in over:
            shown = STDIN_NAME if decoded[j] == "-" else decoded[j]
            print(error_line(VGGFastError(f"{shown} {why}")), file=sys.stderr)
            failed += 1
        images = [images[j] for j in kept]
        names += [decoded[j] for j in kept]
        results += [r for out in outs for r in out]
        if not images:
            continue
        if args.explain:
            plan = eng.plan(images, scales=scales, flip=flip, method=args.method)
            waves = eng._executor.waves(plan, "fc8")
            how = (f"as {len(waves)} grouped wave{'s' if len(waves) > 1 else ''} of "
                   f"{'/'.join(str(len(w)) for w in waves)} batches, one kernel launch per "
                   f"layer each" if any(len(w) > 1 for w in waves)
                   else f"batch by batch on the {eng.backend_name} backend")
            print(f"{plan}\n  runs {how}", file=sys.stderr if args.json else sys.stdout)
    if results:
        _print_results(names, results, args.top, args.json)
    return PARTIAL if failed else 0


def _loc_info(w) -> dict:
    """What `info` reports for a localisation net (an Engine refuses it as a classifier)."""
    meta = w.meta or {}
    return {"task": "localize", "mode": meta.get("mode"), **w.describe(),
            "outputs": w.spec.num_classes, "classifier_classes": meta.get("num_classes"),
            "use": "Engine(classifier, loc_weights=...) / vggfast localize --loc-weights"}


def cmd_info(args) -> int:
    from .weights import load
    if args.weights_pos and args.weights:   # one would be ignored without a word
        raise ArgumentError(f"two weights given ({args.weights_pos} and --weights "
                            f"{args.weights}); describe one: pass it as WEIGHTS or as --weights")
    args.weights = args.weights or os.environ.get("VGGFAST_WEIGHTS")
    weights = args.weights_pos or _need_weights(args)
    w = load(weights, config=args.config)
    if (w.meta or {}).get("task") == "localize":
        info = _loc_info(w)
    else:
        info = _engine(args, w).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>18}: {v}")
    return 0


def sample_images() -> list[Path]:
    """The photos bundled with the package (see vggfast/data/README.md for their sources)."""
    folder = resources.files("vggfast").joinpath("data")
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(SAMPLE_SUFFIXES))


def find_demo_weights() -> str | None:
    """$VGGFAST_WEIGHTS, else the first torchvision VGG checkpoint in the torch hub cache, else
    the first of timm's (the same weights, "timm/vgg16.tv_in1k") in the Hugging Face cache."""
    if os.environ.get("VGGFAST_WEIGHTS"):
        return os.environ["VGGFAST_WEIGHTS"]
    from .errors import WeightsError
    from .weights import hf_checkpoint, hub_checkpoint
    names = ("vgg16", "vgg19", "vgg16_bn", "vgg19_bn", "vgg13", "vgg11", "vgg13_bn", "vgg11_bn")
    for name in names:
        if hub_checkpoint(name) is not None:
            return name
    for name in names:
        try:
            hf_checkpoint(f"timm/{name}.tv_in1k")
        except WeightsError:        # not cached, or no huggingface_hub installed
            continue
        return f"timm/{name}.tv_in1k"
    return None


def cmd_demo(args) -> int:
    from .engine import Engine
    from .nn import build_model
    weights = args.weights or find_demo_weights()
    if weights is None:
        print("NOTE: no trained weights found ($VGGFAST_WEIGHTS, torchvision's vgg16-397923af.pth "
              "in the torch hub cache, or timm's vgg16.tv_in1k in the Hugging Face cache): using "
              "an UNTRAINED VGG16 with random weights; its predictions are meaningless. This "
              "shows the pipeline and its speed only.")
        import torch
        torch.manual_seed(0)
        weights = build_model("D").state_dict()
    eng = Engine(weights, config=args.config, device=args.device, dtype=args.dtype,
                 backend=args.backend, preprocess=args.preprocess)
    print(eng)
    scales = eng.check_scales(args.scales)
    images = sample_images()
    print(f"{len(images)} sample images, scales {list(scales)}, flip on\n")
    eng.classify(images[0], scales=(eng.spec.image_size,), flip=False)  # warm-up
    for path in images:
        t0 = time.perf_counter()
        r = eng.classify(path, scales=scales, flip=True, top_k=5)
        ms = (time.perf_counter() - t0) * 1e3
        print(f"{path.name}  ({ms:.0f} ms)")
        for i, name, p in r.top(5):
            print(f"  {p:7.4f}  {i:4d}  {name}")
    return 0


def cmd_bench(args) -> int:
    from .benchmark import main as bench_main
    return bench_main(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vggfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("classify", help="classify images (dense evaluation, scales and flips)")
    p.add_argument("images", nargs="+",
                   help="image files, folders (their image files, recursively), or - for an "
                        "image file's bytes on standard input")
    _weights_arg(p)
    _engine_args(p)
    p.add_argument("--scales", type=int, nargs="+", default=[256, 384, 512], metavar="Q",
                   help="test scales: each image's smallest side rescaled to Q (default 256 384 "
                        "512)")
    p.add_argument("--no-flip", action="store_true", help="skip the horizontally flipped view")
    p.add_argument("--top", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--method", default="dense", choices=("dense", "multicrop", "dense+multicrop"),
                   help="dense (default; Sec. 3.2), multicrop (a 5x5 grid of crops and their "
                        "flips per scale) or both averaged")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--explain", action="store_true",
                   help="print the scheduler's plan (views, batches, memory) first (on "
                        "standard error with --json, which keeps standard output JSON)")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("info", help="describe weights: configuration, parameters, classes")
    p.add_argument("weights_pos", nargs="?", metavar="WEIGHTS",
                   help="the weights to describe (or --weights)")
    _weights_arg(p)
    _engine_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    # $VGGFAST_WEIGHTS is read in cmd_info, so that only a --weights typed beside WEIGHTS clashes
    p.set_defaults(func=cmd_info, weights=None)

    p = sub.add_parser("demo", help="classify the bundled sample photos with the best weights found")
    _weights_arg(p)
    _engine_args(p)
    p.add_argument("--scales", type=int, nargs="+", default=[256, 384, 512], metavar="Q",
                   help="test scales: each image's smallest side rescaled to Q (default 256 384 "
                        "512)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", add_help=False,
                       help="vggfast vs cuDNN eager vs torch.compile (`vggfast bench --help`)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


@contextlib.contextmanager
def _pil_quiet():
    """PIL's own reports on a damaged file silenced, other warnings printed as one line each.
    PIL's warnings (TIFF tags past the end of the file, read while decoding) and log records (a
    logger.error before it raises) would print beside the command's one-line error, or among
    the results of a file it could still read."""
    log, sink = logging.getLogger("PIL"), logging.NullHandler()  # else logging's last resort
    propagate = log.propagate                                      # prints its records
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.")
        # a warning that does reach the terminal is one line, without the source line it
        # came from (vggfast's own: "vggfast: the Triton kernels are unavailable (...)")
        warnings.showwarning = lambda message, category, *_, **__: print(
            f"{message}" if str(message).startswith("vggfast:") else
            f"{category.__name__}: {message}", file=sys.stderr)
        log.addHandler(sink)
        log.propagate = False
        try:
            with _libtiff_quiet():
                yield
        finally:
            log.removeHandler(sink)
            log.propagate = propagate


@contextlib.contextmanager
def _libtiff_quiet():
    """libtiff's own messages silenced: it writes them to stderr itself, from C ("ZSTDDecode:
    Error in ZSTD_decompressStream()..."), a line beside the one-line error of every damaged
    TIFF; PIL still raises. Pillow offers no switch, so its libtiff's handlers are set to NULL
    (libtiff's documented way to suppress them) through ctypes, where the library can be found
    among the process's mappings (Linux); elsewhere the messages still show."""
    lib = None
    try:
        from PIL import Image  # noqa: F401 - loads PIL's C module, and libtiff with it
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/libtiff" in line})
        if paths:
            import ctypes
            lib = ctypes.CDLL(paths[0])
            for fn in (lib.TIFFSetErrorHandler, lib.TIFFSetWarningHandler):
                fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    except (OSError, AttributeError, ImportError):
        lib = None
    if lib is None:
        yield
        return
    old = lib.TIFFSetErrorHandler(None), lib.TIFFSetWarningHandler(None)
    try:
        yield
    finally:
        lib.TIFFSetErrorHandler(old[0])
        lib.TIFFSetWarningHandler(old[1])


@contextlib.contextmanager
def _printable_stdout():
    """Results name their files on stdout; a name the terminal's encoding cannot show (a file
    name that is not UTF-8, read by Python as lone surrogates, under a strict en_US.UTF-8
    stdout) is printed with backslash escapes, as the one-line errors on stderr print it,
    rather than ending the command with a UnicodeEncodeError traceback after the work."""
    out = sys.stdout
    errors = getattr(out, "errors", None)
    fix = errors == "strict" and callable(getattr(out, "reconfigure", None))
    try:
        if fix:   # its flush fails on a closed pipe or file: that shows (or not) where it did
            out.reconfigure(errors="backslashreplace")
    except (OSError, ValueError):
        fix = False
    try:
        yield
    finally:
        if fix:
            with contextlib.suppress(OSError, ValueError):
                out.reconfigure(errors=errors)


@contextlib.contextmanager
def _guarded_stdout():
    """sys.stdout as a _GuardedStdout for the command's run (the stream it wraps is put back)."""
    out = sys.stdout
    sys.stdout = _GuardedStdout(out)
    try:
        yield
    finally:
        if isinstance(sys.stdout, _GuardedStdout):   # unless the command replaced it itself
            sys.stdout = out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv_given = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser takes every option (argparse.REMAINDER cannot)
        args = argparse.Namespace(func=cmd_bench, args=argv[1:])
    else:
        args, extra = parser.parse_known_args(argv)
        if extra:   # a typo'd option: point at the subcommand's --help, which lists its options
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if argv_given is None:
        distributed.command_ends_process()
    try:
        with _pil_quiet(), _printable_stdout(), _guarded_stdout():
            code = int(args.func(args) or 0)
            sys.stdout.flush()         # a closed pipe shows here, not at interpreter exit
        return code
    except OutputError as exc:         # `vggfast classify ... > /dev/full`: the results are lost
        print(error_line(exc), file=sys.stderr)
        _silence_stdout()
        return PARTIAL
    except VGGFastError as exc:
        print(error_line(exc), file=sys.stderr)
        return PARTIAL
    except KeyboardInterrupt:
        print("vggfast: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:            # `vggfast classify ... | head`: the reader left; no trace
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (RuntimeError, MemoryError) as exc:
        why = allocator_failure(exc)   # a path not wrapped by raising_out_of_memory
        if why is None:
            raise
        print(error_line(OutOfMemoryError(f"{why}; {OUT_OF_MEMORY_ADVICE}")), file=sys.stderr)
        return PARTIAL
    finally:
        distributed.finished()         # under torchrun: the status above is this rank's own
