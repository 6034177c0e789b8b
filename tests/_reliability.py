"""Shared by the reliability tests: the stress switch and the figures report."""

from __future__ import annotations

import json
import os
from typing import Any

STRESS = os.environ.get("CKPTPROTO_STRESS") == "1"


def report(name: str, figures: dict[str, Any]) -> None:
    """Print one JSON line of figures; also append it to $CKPTPROTO_RELIABILITY_REPORT."""
    line = json.dumps({"test": name, "stress": STRESS, **figures})
    print(line)
    target = os.environ.get("CKPTPROTO_RELIABILITY_REPORT")
    if target:
        with open(target, "a") as f:
            f.write(line + "\n")
