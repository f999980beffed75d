"""The catalogue (``models.toml``): how to serve each model, not where.

Clients name a model by its id, an alias, or the source-qualified id a neuron reports
(``helexa:Qwen/Qwen3-8B-GGUF``); the catalogue maps all of them to one canonical id, so
routing, metrics and ``/v1/models`` agree on a name. It also answers the placement
questions (how much memory, how many devices), which nodes a model is pinned on (from the
file, plus pins an operator adds at run time) and the per-model sampling defaults the
gateway merges under a request's own values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from helexa.config import ModelProfile, Settings


@dataclass(frozen=True)
class Requirements:
    """What a placement must provide: memory in total and per device, and device count."""

    vram_mb: int = 0  # 0: unknown, let the neuron's preflight decide
    min_devices: int = 1
    min_device_vram_mb: int = 0


class Catalogue:
    def __init__(self, profiles: list[ModelProfile]) -> None:
        self._profiles: dict[str, ModelProfile] = {p.id: p for p in profiles}
        self._names: dict[str, str] = {}
        for p in profiles:
            for name in (p.qualified_id, *p.names):
                self._names[name] = p.id
        self._pins: set[tuple[str, str]] = set()
        self._unpins: set[tuple[str, str]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalogue:
        return cls(list(settings.models))

    def __iter__(self) -> Iterator[ModelProfile]:
        return iter(self._profiles.values())

    def __len__(self) -> int:
        return len(self._profiles)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._names

    def canonical(self, name: str) -> str:
        """The catalogue id for an id, alias or qualified id; other names pass through."""
        return self._names.get(name, name)

    def profile(self, name: str) -> ModelProfile | None:
        return self._profiles.get(self.canonical(name))

    def qualified_id(self, name: str) -> str:
        """The id a neuron knows ``name`` by (see :attr:`ModelProfile.qualified_id`)."""
        profile = self.profile(name)
        return profile.qualified_id if profile else name

    def requirements(self, name: str) -> Requirements:
        p = self.profile(name)
        if p is None:
            return Requirements()
        return Requirements(p.vram_mb, max(1, p.min_devices), p.min_device_vram_mb)

    def priority(self, name: str) -> int:
        p = self.profile(name)
        return p.priority if p else 0

    # -- pinning -------------------------------------------------------------------------

    def is_pinned(self, model: str, node: str) -> bool:
        """Pinned models are never evicted from that node (idle or under pressure)."""
        key = (self.canonical(model), node)
        if key in self._pins:
            return True
        p = self.profile(model)
        return p is not None and node in p.pinned_on and key not in self._unpins

    def pinned_nodes(self, model: str) -> set[str]:
        canonical = self.canonical(model)
        p = self.profile(model)
        nodes = {n for n in (p.pinned_on if p else ()) if (canonical, n) not in self._unpins}
        return nodes | {n for m, n in self._pins if m == canonical}

    def pin(self, model: str, node: str) -> None:
        key = (self.canonical(model), node)
        self._pins.add(key)
        self._unpins.discard(key)

    def unpin(self, model: str, node: str) -> None:
        """Lifts a run-time pin, and a models.toml one until the gateway restarts."""
        key = (self.canonical(model), node)
        self._pins.discard(key)
        self._unpins.add(key)

    # -- sampling ------------------------------------------------------------------------

    def sampling_defaults(self, name: str) -> dict[str, Any]:
        p = self.profile(name)
        return p.sampling.model_dump(exclude_none=True) if p else {}

    def apply_sampling(self, name: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """``request`` (an OpenAI chat body) with this model's defaults under its values.

        A value the client sent, even a falsy one like ``temperature: 0``, always wins;
        ``max_tokens`` is not defaulted when the client sent ``max_completion_tokens``.
        """
        out = dict(request)
        for key, value in self.sampling_defaults(name).items():
            if key == "max_tokens" and out.get("max_completion_tokens") is not None:
                continue
            if out.get(key) is None:
                out[key] = value
        return out
