"""Errors a checkpoint loader raises, shared by the GGUF and safetensors loaders.

They live apart from both loaders so preflight (helexa.neuron.preflight) can catch them
without importing either, and map them to a structured 422 before any device memory
is touched. Both subclass ValueError: the file is the bad input, not the program.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be used as it is (corrupt, incomplete)."""


class UnsupportedArchitecture(CheckpointError):
    """The checkpoint is readable but its architecture has no model implementation (yet).

    Carries the architecture name separately so callers can report it as a field rather
    than parse the message.
    """

    def __init__(
        self,
        architecture: str,
        *,
        source: str = "",
        supported: tuple[str, ...] = (),
        detail: str = "",
    ) -> None:
        self.architecture = architecture
        self.source = source
        self.supported = supported
        where = f"{source}: " if source else ""
        message = f"{where}architecture {architecture!r} is not supported"
        if detail:
            message += f" ({detail})"
        if supported:
            message += f"; supported: {', '.join(supported)}"
        super().__init__(message)
