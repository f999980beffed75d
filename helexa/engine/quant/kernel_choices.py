"""Which of several equivalent kernels is fastest for a shape on a GPU model, kept on disk.

helexa.engine.quant.triton_kernels has two matvec kernels and measures, per shape, which
is faster; Triton keeps each kernel's own tuning on disk, and this keeps the choice
between them beside it, so a restart runs neither measurement again.
"""

from __future__ import annotations

import json
import os
from typing import Any


class KernelChoices:
    """The fastest kernel (one of ``names``) per GPU model and shape, as a small JSON file
    in ``directory`` (Triton's cache dir). Any unreadable or foreign content counts as
    nothing remembered: it is only a hint, measured again when missing."""

    FILE = "helexa-kernel-choices.json"

    def __init__(self, directory: str | None, *, names: tuple[str, ...]) -> None:
        self.path = os.path.join(directory, self.FILE) if directory else None
        self.names = names  # the kernels a choice may name
        self._known: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._known is None:
            self._known = {}
            if self.path is not None:
                try:
                    with open(self.path) as f:
                        data = json.load(f)
                except (OSError, ValueError):
                    data = {}
                if isinstance(data, dict):
                    self._known = {k: v for k, v in data.items() if v in self.names}
        return self._known

    def get(self, gpu: str, key: tuple[Any, ...]) -> str | None:
        return self._load().get(f"{gpu}|{key}")

    def put(self, gpu: str, key: tuple[Any, ...], name: str) -> None:
        known = self._load()
        known[f"{gpu}|{key}"] = name
        if self.path is None:
            return
        try:  # written whole, then renamed: a reader never sees half a file
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(known, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache dir: measured again next time
