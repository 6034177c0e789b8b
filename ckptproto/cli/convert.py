"""``ckptproto convert SRC DST --to FORMAT``: convert between ckptproto, torch.save, flat
safetensors and DCP::

    $ ckptproto convert model.pt checkpoints/model --to ckptproto
    $ ckptproto convert checkpoints/model model.safetensors --to safetensors
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = """\
Convert a checkpoint. The source format is detected (a ckptproto directory, a DCP directory,
a torch.save file, a safetensors file) unless --from says it.

torch.save files are read with torch.load(weights_only=True): a file that needs full
unpickling is refused. --unsafe-allow-pickle lifts that for files you trust completely, since
unpickling can run arbitrary code.

DCP directories: DCP's .metadata file is a pickle; it is read by an unpickler that builds only
DCP's own metadata classes and refuses anything else, unless --unsafe-allow-pickle.

--unsafe-allow-pickle also stores what such files commonly hold in plain form (an
argparse.Namespace as a dict, torch.Size as a tuple, enums as their values, ...); each
change is listed on stderr.

--to torch writes numpy arrays as tensors, so torch.load reads the file with its defaults
(weights_only=True); --keep-numpy keeps them numpy arrays (an exact round trip).

--to safetensors writes one flat file (tensor names are dotted state paths); the non-tensor
state is kept, exactly, as JSON in the file's __metadata__.
"""


def register(sub: Any) -> None:
    from ckptproto.interop.convert import FORMATS

    parser = sub.add_parser(
        "convert",
        help="convert to and from torch.save, safetensors and DCP",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="the checkpoint to read")
    parser.add_argument("dst", metavar="DST", help="where to write the converted checkpoint")
    parser.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    parser.add_argument("--from", dest="source_format", choices=FORMATS, help="the source format (detected)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument(
        "--unsafe-allow-pickle",
        action="store_true",
        help="UNSAFE: fully unpickle torch.save files / DCP values (runs code from the file); trusted files only",
    )
    parser.add_argument(
        "--keep-numpy",
        action="store_true",
        help="--to torch: keep numpy arrays as arrays (torch.load then needs them allowlisted)",
    )
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show progress"
    )
    bar.add_argument("--quiet", dest="progress", action="store_false", help="never show progress")
    parser.set_defaults(run=run)


def _subscript(path: str) -> str:
    """``extra.obj.0`` -> ``["extra"]["obj"][0]`` (digits are list indices or int keys)."""
    return "".join(f"[{p}]" if p.isdigit() else f"[{p!r}]" for p in path.split(".") if p)


def run(args: argparse.Namespace) -> int:
    from ckptproto.cli.paths import missing_problem
    from ckptproto.errors import CheckpointNotFoundError, UnsupportedValueError
    from ckptproto.interop.convert import convert
    from ckptproto.policy.locations import resolve

    resolve(args.dst)  # a URL no backend serves is refused before anything else
    storage, src = resolve(args.src)
    if not storage.exists(src):
        raise CheckpointNotFoundError(missing_problem(src))
    if args.unsafe_allow_pickle:
        print("ckptproto convert: --unsafe-allow-pickle: the source will be fully unpickled", file=sys.stderr)
    try:
        result = convert(
            args.src,
            args.dst,
            to=args.to,
            source_format=args.source_format,
            allow_pickle=args.unsafe_allow_pickle,
            overwrite=args.overwrite,
            progress=args.progress,
            keep_numpy=args.keep_numpy,
        )
    except UnsupportedValueError as exc:
        if not args.unsafe_allow_pickle:
            raise
        # An object with no plain equivalent: only the user knows what it stands for.
        print(
            f"ckptproto convert: {exc}. Convert it in Python: state = torch.load({args.src!r}, "
            f"weights_only=False); replace or delete state{_subscript(exc.path)}; "
            f"ckptproto.save(state, {args.dst!r})",
            file=sys.stderr,
        )
        return 2
    shown = 10
    for note in result.notes[:shown]:
        print(f"ckptproto convert: note: {note}", file=sys.stderr)
    if len(result.notes) > shown:
        print(f"ckptproto convert: note: ... and {len(result.notes) - shown} more", file=sys.stderr)
    print(
        f"{result.source_format} -> {result.target_format}: {result.destination} "
        f"({result.tensors} tensors, {result.nbytes} bytes)"
    )
    return 0
