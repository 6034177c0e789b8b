"""``python -m ckptproto``: the command line."""

import sys

from ckptproto.cli import main

sys.exit(main())
