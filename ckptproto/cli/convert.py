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
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show progress"
    )
    bar.add_argument("--quiet", dest="progress", action="store_false", help="never show progress")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ckptproto.interop.convert import convert

    if args.unsafe_allow_pickle:
        print("ckptproto convert: --unsafe-allow-pickle: the source will be fully unpickled", file=sys.stderr)
    result = convert(
        args.src,
        args.dst,
        to=args.to,
        source_format=args.source_format,
        allow_pickle=args.unsafe_allow_pickle,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(
        f"{result.source_format} -> {result.target_format}: {result.destination} "
        f"({result.tensors} tensors, {result.nbytes} bytes)"
    )
    return 0
