"""CheckpointInfo: what a committed checkpoint says about itself, read from its manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ckptproto.format.manifest import Manifest
from ckptproto.location import Location


@dataclass(frozen=True)
class CheckpointInfo:
    """Summary of one checkpoint::

    info = ckptproto.save(state, "ckpt/step_100", metadata={"step": 100})
    print(info.step, info.nbytes, info.format_version)
    """

    path: Location
    step: int | None
    epoch: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    created: datetime | None = None
    nbytes: int = 0
    format_version: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str | None) -> float | None:
        """The named metric as a float, or None when absent or not a number."""
        if name is None:
            return None
        value = self.metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    @classmethod
    def from_manifest(cls, path: Location, manifest: Manifest, metadata: dict[str, Any]) -> CheckpointInfo:
        step, epoch = metadata.get("step"), metadata.get("epoch")
        metrics = metadata.get("metrics")
        try:
            created: datetime | None = datetime.fromisoformat(manifest.created)
        except ValueError:
            created = None
        return cls(
            path=path,
            step=step if type(step) is int else None,
            epoch=epoch if type(epoch) is int else None,
            metrics=(
                {k: v for k, v in metrics.items() if isinstance(k, str)} if isinstance(metrics, dict) else {}
            ),
            created=created,
            nbytes=manifest.nbytes,
            format_version=f"{manifest.version[0]}.{manifest.version[1]}",
            metadata=metadata,
        )
