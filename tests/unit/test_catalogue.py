"""The catalogue: names, qualified ids, requirements, pins and sampling defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from helexa.config import ModelProfile, SamplingDefaults, load_settings
from helexa.cortex.catalogue import Catalogue, Requirements

PROFILES = [
    ModelProfile(
        id="Qwen/Qwen3-8B-GGUF:Q4_K_M",
        aliases=["qwen3-8b"],
        vram_mb=6500,
        min_devices=1,
        min_device_vram_mb=8000,
        priority=10,
        pinned_on=["beast"],
        sampling=SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, max_tokens=512),
    ),
    ModelProfile(id="Qwen/Qwen3-14B-GGUF:Q6_K", source="helexa", aliases=["q14"], vram_mb=13000),
    ModelProfile(id="org/blank-source", source=""),
]


@pytest.fixture
def catalogue() -> Catalogue:
    return Catalogue(PROFILES)


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (ModelProfile(id="org/name"), "org/name"),
        (ModelProfile(id="org/name", source="helexa"), "helexa:org/name"),
        (ModelProfile(id="org/name:Q8_0", source="helexa"), "helexa:org/name:Q8_0"),
        (ModelProfile(id="org/name", source=""), "org/name"),
    ],
)
def test_qualified_id(profile: ModelProfile, expected: str) -> None:
    assert profile.qualified_id == expected


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("qwen3-8b", "Qwen/Qwen3-8B-GGUF:Q4_K_M"),
        ("Qwen/Qwen3-8B-GGUF:Q4_K_M", "Qwen/Qwen3-8B-GGUF:Q4_K_M"),
        ("q14", "Qwen/Qwen3-14B-GGUF:Q6_K"),
        ("helexa:Qwen/Qwen3-14B-GGUF:Q6_K", "Qwen/Qwen3-14B-GGUF:Q6_K"),  # as a neuron reports it
        ("not/in-catalogue", "not/in-catalogue"),
    ],
)
def test_canonical(catalogue: Catalogue, name: str, canonical: str) -> None:
    assert catalogue.canonical(name) == canonical


def test_profile_and_membership(catalogue: Catalogue) -> None:
    assert catalogue.profile("q14") is PROFILES[1]
    assert catalogue.profile("nope/nope") is None
    assert "qwen3-8b" in catalogue and "nope/nope" not in catalogue
    assert [p.id for p in catalogue] == [p.id for p in PROFILES] and len(catalogue) == 3
    assert catalogue.qualified_id("q14") == "helexa:Qwen/Qwen3-14B-GGUF:Q6_K"
    assert catalogue.qualified_id("other/model") == "other/model"


def test_requirements(catalogue: Catalogue) -> None:
    assert catalogue.requirements("qwen3-8b") == Requirements(6500, 1, 8000)
    assert catalogue.requirements("unknown/model") == Requirements(0, 1, 0)
    assert catalogue.priority("qwen3-8b") == 10 and catalogue.priority("q14") == 0


def test_pins_from_file_and_at_run_time(catalogue: Catalogue) -> None:
    assert catalogue.is_pinned("qwen3-8b", "beast")
    assert not catalogue.is_pinned("qwen3-8b", "benjy")
    catalogue.pin("q14", "benjy")
    assert catalogue.is_pinned("helexa:Qwen/Qwen3-14B-GGUF:Q6_K", "benjy")
    assert catalogue.pinned_nodes("q14") == {"benjy"}
    catalogue.unpin("Qwen/Qwen3-8B-GGUF:Q4_K_M", "beast")  # a models.toml pin, lifted
    assert not catalogue.is_pinned("qwen3-8b", "beast")
    assert catalogue.pinned_nodes("qwen3-8b") == set()
    catalogue.pin("qwen3-8b", "beast")
    assert catalogue.is_pinned("qwen3-8b", "beast")
    catalogue.pin("adhoc/model", "local")  # models outside the catalogue can be pinned too
    assert catalogue.is_pinned("adhoc/model", "local")


def test_apply_sampling_puts_defaults_under_request_values(catalogue: Catalogue) -> None:
    request = {"model": "qwen3-8b", "messages": [], "temperature": 0, "top_p": None}
    merged = catalogue.apply_sampling("qwen3-8b", request)
    assert merged["temperature"] == 0  # the client's value, even falsy
    assert merged["top_p"] == 0.95 and merged["top_k"] == 20 and merged["max_tokens"] == 512
    assert "min_p" not in merged  # unset defaults add nothing
    assert request["top_p"] is None  # the caller's dict is not modified


def test_apply_sampling_respects_max_completion_tokens(catalogue: Catalogue) -> None:
    merged = catalogue.apply_sampling("qwen3-8b", {"max_completion_tokens": 64})
    assert "max_tokens" not in merged


def test_apply_sampling_unknown_model_is_identity(catalogue: Catalogue) -> None:
    assert catalogue.apply_sampling("x/y", {"temperature": 1.0}) == {"temperature": 1.0}


def test_from_settings_reads_the_example_catalogue() -> None:
    examples = Path(__file__).parents[2] / "assets"
    settings = load_settings(
        examples / "helexa.example.toml", examples / "models.example.toml", environ={}
    )
    catalogue = Catalogue.from_settings(settings)
    assert len(catalogue) == len(settings.models) > 0
    for profile in settings.models:
        for alias in profile.aliases:
            assert catalogue.canonical(alias) == profile.id
