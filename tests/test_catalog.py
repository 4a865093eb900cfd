"""Catalog parsing, merging and every error case: each message names file, model, field, fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from localsample.catalog import (
    KV_TYPES,
    ModelEntry,
    load_catalog,
    new_entry_fields,
    parse_catalog,
    resolve_model_path,
)
from localsample.errors import CatalogError, ModelFileError, UnknownModelError
from localsample.gguf_file import read_gguf
from localsample.packaged import index_model_for

from .stub_hub import make_gguf

GOOD = """
[[models]]
id = "mine"
source = "mine.gguf"
aliases = ["gpt-4o"]
cost = 0.2
[models.load]
n_ctx = 1024
split_mode = "row"
type_k = "q8_0"
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_packaged_catalog_is_valid_and_has_the_default_model() -> None:
    catalog = load_catalog(None)
    entry = catalog.get("smollm2-135m-instruct")
    assert index_model_for(entry.id, entry.source) is not None  # `localsample models pull` installs it
    assert catalog.get("HAIKU").id == entry.id  # aliases are case-insensitive
    assert all(0 <= m.cost <= 1 and 0 <= m.speed <= 1 and 0 <= m.intelligence <= 1 for m in catalog)


def test_load_settings_take_llama_cpp_names_and_enum_names() -> None:
    [model] = parse_catalog(GOOD, "x.toml")
    kwargs = model.load.llama_kwargs()
    assert kwargs["n_ctx"] == 1024
    assert kwargs["split_mode"] == 2
    assert kwargs["type_k"] == KV_TYPES["q8_0"]
    assert kwargs["n_threads"] == os.cpu_count()  # not llama-cpp-python's cpu_count()//2
    assert "tensor_split" not in kwargs  # unset values are left to llama.cpp


def test_user_catalog_extends_and_overrides_by_id(tmp_path: Path) -> None:
    user = write(
        tmp_path / "user.toml",
        GOOD + '\n[[models]]\nid = "smollm2-135m-instruct"\nsource = "/elsewhere/x.gguf"\n',
    )
    catalog = load_catalog(user)
    assert catalog.get("mine").load.n_ctx == 1024
    overridden = catalog.get("smollm2-135m-instruct")
    assert overridden.source == "/elsewhere/x.gguf"
    assert overridden.aliases == []  # replaced whole, not merged field by field
    assert catalog.origin("mine") == str(user)
    assert catalog.get("gpt-4o").id == "mine"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[models]]\nid = "a"\nsource = "a.gguf"\nn_gpu = 3\n', ["model 'a'", "field 'n_gpu'", "unknown field"]),
        (
            '[[models]]\nid = "a"\nsource = "a.gguf"\n[models.load]\nn_gpu_layer = 3\n',
            ["model 'a'", "field 'load.n_gpu_layer'", "unknown field", "llama.cpp"],
        ),
        (
            '[[models]]\nid = "a"\nsource = "a.gguf"\ncost = 1.5\n',
            ["model 'a'", "field 'cost'", "1.5", "less than or equal to 1"],
        ),
        ('[[models]]\nid = "a"\nsource = "a.gguf"\n[models.load]\nn_ctx = -1\n', ["field 'load.n_ctx'", "-1"]),
        ('[[models]]\nid = "A b"\nsource = "a.gguf"\n', ["field 'id'", "'A b'"]),
        ('[[models]]\nid = "a"\n', ["model 'a'", "field 'source'", "required", "add source", "endpoint ="]),
        ('[[models]]\nid = "a"\nsource = "a"\nendpoint = "http://h/v1"\n', ["model 'a'", "not both"]),
        ('[[models]]\nid = "a"\nendpoint = "gpu-box:8000"\n', ["field 'endpoint'", "should match"]),
        ('[[models]]\nid = "a"\nsource = "a.gguf"\ncapabilities = ["telepathy"]\n', ["field 'capabilities.0'"]),
        ('[[models]]\nid = "a"\nsource = "a.gguf"\naliases = ["../x.gguf"]\n', ["field 'aliases'", "plain name"]),
        ('[[models]]\nid = "a"\nsource = "a"\n[[models]]\nid = "a"\nsource = "b"\n', ["model 'a'", "duplicate id"]),
        ("[[models]\n", ["not valid TOML", "line 1"]),
        ('model = "x"\n', ["unknown top-level key", "'model'", "[[models]]"]),
    ],
)
def test_every_catalog_error_names_file_model_field_and_fix(text: str, expected: list[str], tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert str(path) in message
    assert "fix" in message
    for part in expected:
        assert part in message


def test_all_errors_of_a_file_are_reported_at_once(tmp_path: Path) -> None:
    text = '[[models]]\nid = "a"\nsource = "a"\ncost = 2\n[[models]]\nid = "b"\nspeed = -1\n'
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert "model 'a': field 'cost'" in message
    assert "model 'b': field 'source'" in message
    assert "model 'b': field 'speed'" in message


def test_an_alias_claimed_by_two_models_of_one_file_names_both(tmp_path: Path) -> None:
    path = write(
        tmp_path / "user.toml",
        '[[models]]\nid = "one"\nsource = "o.gguf"\naliases = ["fast"]\n'
        '[[models]]\nid = "two"\nsource = "t.gguf"\naliases = ["Fast"]\n',
    )
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert str(path) in message
    assert "model 'two': field 'aliases': 'Fast' is already claimed by model 'one'" in message
    assert "fix: remove it from one of them" in message


def test_the_user_catalog_takes_over_a_packaged_alias(tmp_path: Path) -> None:
    path = write(tmp_path / "user.toml", '[[models]]\nid = "mine"\nsource = "m.gguf"\naliases = ["Haiku"]\n')
    catalog = load_catalog(path)
    assert catalog.get("haiku").id == "mine"
    assert "haiku" not in catalog.get("smollm2-135m-instruct").aliases
    assert "mini" in catalog.get("smollm2-135m-instruct").aliases


def test_unknown_model_lists_known_ids() -> None:
    with pytest.raises(UnknownModelError) as info:
        load_catalog(None).get("gpt-7")
    assert "gpt-7" in str(info.value) and "smollm2-135m-instruct" in str(info.value)


def test_missing_local_file_names_path_and_fix(tmp_path: Path) -> None:
    [model] = parse_catalog(GOOD, "x.toml")
    with pytest.raises(ModelFileError) as info:
        resolve_model_path(model, tmp_path)
    assert str(tmp_path / "mine.gguf") in str(info.value)
    assert "fix: register a GGUF of your own with `localsample models import PATH`" in str(info.value)


def test_missing_default_model_says_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError) as info:
        resolve_model_path(load_catalog(None).get("smollm2-135m-instruct"), tmp_path)
    assert "fix: download it with `localsample models pull smollm2-135m-instruct`" in str(info.value)


def test_a_new_entry_from_a_file_caps_n_ctx_and_names_its_origin(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(make_gguf(name="X", context=32768))
    fields = new_entry_fields("x", "x.gguf", read_gguf(path), "imported from here", mmproj="mm.gguf")
    assert fields["load"] == {"n_ctx": 8192} and fields["capabilities"] == ["chat", "vision"]
    assert fields["description"] == "X, Q4_K_M, imported from here" and fields["mmproj"] == "mm.gguf"
    assert ModelEntry.model_validate(fields).load.n_ctx == 8192  # a valid catalog entry


def test_hf_source_not_in_cache_says_how_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = load_catalog(None).get("qwen2.5-1.5b-instruct")
    with pytest.raises(ModelFileError) as info:
        resolve_model_path(model, tmp_path)
    assert "not downloaded" in str(info.value)
    assert "localsample models pull qwen2.5-1.5b-instruct" in str(info.value)
