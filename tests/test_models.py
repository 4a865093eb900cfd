"""`localsample models pull | list | show | rm | import` against a local stub hub.

Every command runs as a real process, with HF_ENDPOINT pointing at the stub and HF_HOME
in a temporary directory, as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localsample.errors import HubError
from localsample.gguf_file import read_gguf
from localsample.hub import PullPlan, RemoteFile, check_space, hub_error

from .conftest import real_model_dir
from .stub_hub import StubHub, make_gguf

TINY = "org/Tiny-GGUF"


@pytest.fixture
def hub(model_dir: Path) -> Iterator[StubHub]:
    stub = StubHub(
        repos={
            TINY: {
                "tiny-Q4_K_M.gguf": make_gguf(),
                "tiny-Q8_0.gguf": make_gguf(file_type=7, context=32768),
                "README.md": b"# tiny",
            },
            "org/Choices-GGUF": {"c-Q5_K_M.gguf": make_gguf(file_type=17), "c-Q8_0.gguf": make_gguf(file_type=7)},
            "org/Split-GGUF": {
                "big-Q4_K_M-00001-of-00002.gguf": make_gguf(tensors=3, extra={"split.count": 2}),
                "big-Q4_K_M-00002-of-00002.gguf": make_gguf(tensors=2, extra={"split.count": 2}),
            },
            "org/Vision-GGUF": {
                "vis-Q4_K_M.gguf": make_gguf(name="Vis"),
                "mmproj-vis-f16.gguf": make_gguf(arch="clip", template=None),
            },
            "org/NoGGUF": {"model.safetensors": b"\0" * 64, "config.json": b"{}"},
            "org/Real-GGUF": {"smol-Q4_1.gguf": real_model_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"},
        }
    ).start()
    yield stub
    stub.stop()


@pytest.fixture
def env(hub: StubHub, isolated: Path) -> dict[str, str]:
    return os.environ | {"HF_ENDPOINT": hub.url, "HF_HOME": str(isolated / "hf"), "HF_HUB_OFFLINE": "0"}


def models(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "localsample", "models", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc


def user_catalog(isolated: Path) -> dict[str, Any]:
    path = isolated / "models.toml"
    return {m["id"]: m for m in tomllib.loads(path.read_text())["models"]} if path.is_file() else {}


def listed(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in json.loads(models(env, "list", "--json").stdout)}


def test_pull_org_repo_takes_q4_k_m_and_registers_it(env: dict[str, str], isolated: Path, hub: StubHub) -> None:
    out = json.loads(models(env, "pull", TINY, "--json").stdout)
    assert out["id"] == "tiny-q4_k_m" and out["catalog"] == "added"
    [path] = out["files"]
    assert "/hf/hub/models--org--Tiny-GGUF/snapshots/" in path  # the shared HF cache
    entry = user_catalog(isolated)["tiny-q4_k_m"]
    assert entry["source"] == "hf://org/Tiny-GGUF/tiny-Q4_K_M.gguf"
    assert entry["load"]["n_ctx"] == 4096 and entry["capabilities"] == ["chat"] and entry["family"] == "llama"
    row = listed(env)["tiny-q4_k_m"]
    assert row["status"] == "downloaded" and row["quant"] == "Q4_K_M" and row["size"] == len(make_gguf())
    assert listed(env)["qwen2.5-3b-instruct"]["status"] == "missing"


def test_pull_quant_choice_and_the_errors_that_list_choices(env: dict[str, str], isolated: Path) -> None:
    out = json.loads(models(env, "pull", f"{TINY}:q8_0", "--json").stdout)
    assert out["id"] == "tiny-q8_0"
    assert user_catalog(isolated)["tiny-q8_0"]["load"]["n_ctx"] == 8192  # trained 32768, capped
    missing = models(env, "pull", f"{TINY}:Q2_K", ok=False)
    assert "no Q2_K GGUF (it has: Q4_K_M, Q8_0)" in missing.stderr
    ambiguous = models(env, "pull", "org/Choices-GGUF", ok=False)
    assert "several quantizations: Q5_K_M, Q8_0" in ambiguous.stderr and "org/Choices-GGUF:QUANT" in ambiguous.stderr
    assert "tiny-q4_k_m" not in user_catalog(isolated)


def test_pull_hf_uri_and_catalog_id_and_again_is_instant(env: dict[str, str], isolated: Path, hub: StubHub) -> None:
    models(env, "pull", "hf://org/Tiny-GGUF/tiny-Q8_0.gguf", "--id", "eight")
    assert user_catalog(isolated)["eight"]["source"] == "hf://org/Tiny-GGUF/tiny-Q8_0.gguf"
    before = len(hub.requests)
    again = models(env, "pull", "eight")  # a catalog id, already downloaded: no network at all
    assert "eight: 704 B ready (in the catalog)" in again.stdout
    assert hub.requests[before:] == []
    models(env, "pull", "hf://org/Tiny-GGUF/tiny-Q8_0.gguf")
    assert hub.requests[before:] == []


def test_split_models_pull_every_part(env: dict[str, str], isolated: Path) -> None:
    out = json.loads(models(env, "pull", "org/Split-GGUF", "--json").stdout)
    assert [Path(f).name for f in out["files"]] == ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
    assert user_catalog(isolated)["big-q4_k_m"]["source"].endswith("big-Q4_K_M-00001-of-00002.gguf")
    shown = json.loads(models(env, "show", "big-q4_k_m", "--json").stdout)
    assert shown["split_parts"] == 2 and shown["parameters"] == 5 * 32  # tensors of both parts
    assert listed(env)["big-q4_k_m"]["size"] == sum(Path(f).stat().st_size for f in out["files"])


def test_a_vision_repo_brings_its_projector(env: dict[str, str], isolated: Path) -> None:
    out = json.loads(models(env, "pull", "org/Vision-GGUF", "--json").stdout)
    assert [Path(f).name for f in out["files"]] == ["vis-Q4_K_M.gguf", "mmproj-vis-f16.gguf"]
    entry = user_catalog(isolated)["vis-q4_k_m"]
    assert entry["mmproj"] == "hf://org/Vision-GGUF/mmproj-vis-f16.gguf" and "vision" in entry["capabilities"]
    shown = json.loads(models(env, "show", "vis-q4_k_m", "--json").stdout)
    assert shown["vision_projector"].endswith("mmproj-vis-f16.gguf")
    assert shown["projector_reads"] == ["vision"]  # an older projector: no has_*_encoder keys


def test_a_checksum_mismatch_is_rejected_and_nothing_is_kept(env: dict[str, str], isolated: Path, hub: StubHub) -> None:
    hub.corrupt.add("tiny-Q4_K_M.gguf")
    failed = models(env, "pull", TINY, ok=False)
    assert "does not match the hub's checksum" in failed.stderr and "fix: pull again" in failed.stderr
    assert user_catalog(isolated) == {}
    assert not list((isolated / "hf").rglob("tiny-Q4_K_M.gguf"))


def test_an_interrupted_download_is_never_registered_and_a_rerun_completes(
    env: dict[str, str], isolated: Path, hub: StubHub
) -> None:
    hub.cut_after["tiny-Q4_K_M.gguf"] = 300  # every attempt breaks after 300 bytes
    failed = models(env, "pull", TINY, ok=False)
    assert "pull again" in failed.stderr
    assert user_catalog(isolated) == {}
    del hub.cut_after["tiny-Q4_K_M.gguf"]
    models(env, "pull", TINY)
    assert read_gguf(Path(json.loads(models(env, "show", "tiny-q4_k_m", "--json").stdout)["path"])).parameters == 64


def test_offline_pull_says_so_and_sends_nothing(env: dict[str, str], hub: StubHub) -> None:
    failed = models(env | {"HF_HUB_OFFLINE": "1"}, "pull", TINY, ok=False)
    assert "offline (HF_HUB_OFFLINE is set)" in failed.stderr and "models import" in failed.stderr
    assert hub.requests == []


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("org/Nope-GGUF", "no such repository on the hub"),
        ("hf://org/Tiny-GGUF/nope.gguf", "no file nope.gguf"),
        ("org/NoGGUF", "has no GGUF model files (2 files"),
        ("not a ref!", "neither a catalog model nor a hub reference"),
    ],
)
def test_pull_errors_name_the_problem_and_the_fix(env: dict[str, str], ref: str, message: str) -> None:
    failed = models(env, "pull", ref, ok=False)
    assert message in failed.stderr and "fix:" in failed.stderr


def test_pulling_a_local_file_entry_names_import(env: dict[str, str], isolated: Path) -> None:
    (isolated / "models.toml").write_text('[[models]]\nid = "mine"\nsource = "/somewhere/mine.gguf"\n')
    failed = models(env, "pull", "mine", ok=False)
    assert "model 'mine' is a local file (/somewhere/mine.gguf), not on the hub" in failed.stderr
    assert "fix: register a GGUF of your own with `localsample models import PATH`" in failed.stderr


def test_a_listed_sha256_is_checked(env: dict[str, str], isolated: Path) -> None:
    source = "hf://org/Tiny-GGUF/tiny-Q4_K_M.gguf"
    (isolated / "models.toml").write_text(f'[[models]]\nid = "t"\nsource = "{source}"\nsha256 = "{"0" * 64}"\n')
    failed = models(env, "pull", "t", ok=False)
    assert "does not match the sha256 in its catalog entry" in failed.stderr and "models rm t" in failed.stderr


def test_an_unknown_revision_is_named(env: dict[str, str]) -> None:
    failed = models(env, "pull", TINY, "--revision", "v9", ok=False)
    assert "no such revision" in failed.stderr


def test_a_full_disk_is_refused_before_downloading(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 5))
    plan = PullPlan(TINY, None, [RemoteFile("a.gguf", 1000, None)], listing=[RemoteFile("a.gguf", 1000, None)])
    with pytest.raises(HubError, match=r"needs 1\.0 KB, 5 B is free"):
        check_space(plan, plan.files)
    assert "the disk is full" in str(hub_error(OSError(28, "No space left on device"), "downloading x"))


def test_a_pulled_real_model_generates(env: dict[str, str]) -> None:
    models(env, "pull", "org/Real-GGUF", "--id", "pulled-smol")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "localsample",
            "sample",
            "Say hi.",
            "--model",
            "pulled-smol",
            "--json",
            "--max-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
        env=env | {"HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "pulled-smol"


def test_rm_frees_the_cache_and_drops_the_entry(env: dict[str, str], isolated: Path) -> None:
    models(env, "pull", TINY)
    refused = models(env, "rm", "tiny-q4_k_m", ok=False)  # no terminal to ask on
    assert "pass --yes" in refused.stderr
    done = models(env, "rm", "tiny-q4_k_m", "--yes")
    assert "removed tiny-q4_k_m: freed 704 B" in done.stdout
    assert "tiny-q4_k_m" not in user_catalog(isolated)
    assert not list((isolated / "hf").rglob("tiny-Q4_K_M.gguf"))
    assert not [p for p in (isolated / "hf").rglob("blobs/*") if p.stat().st_size == 704]


def test_import_registers_a_local_file_and_rm_leaves_it(env: dict[str, str], isolated: Path) -> None:
    model = isolated / "Mine-Q5_K_M.gguf"
    model.write_bytes(make_gguf(file_type=17, name="Mine"))
    out = models(env, "import", str(model))
    assert "mine-q5_k_m: added to your catalog" in out.stdout
    assert user_catalog(isolated)["mine-q5_k_m"]["source"] == str(model)
    shown = json.loads(models(env, "show", "mine-q5_k_m", "--json").stdout)
    assert shown["quantization"] == "Q5_K_M" and shown["path"] == str(model)
    removed = models(env, "rm", "mine-q5_k_m", "--yes")
    assert "left in place" in removed.stdout and model.is_file()


def test_import_copy_puts_it_in_the_store(env: dict[str, str], isolated: Path) -> None:
    store = isolated / "store"
    model = isolated / "elsewhere.gguf"
    model.write_bytes(make_gguf())
    models(env | {"LOCALSAMPLE_MODEL_DIR": str(store)}, "import", str(model), "--id", "copied", "--copy")
    assert (store / "elsewhere.gguf").read_bytes() == model.read_bytes()
    assert user_catalog(isolated)["copied"]["source"] == "elsewhere.gguf"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"<html>not a model</html>", "is not a GGUF file"),
        (make_gguf()[:40], "is a damaged GGUF file"),
        (make_gguf(arch="clip", template=None), "is a vision projector"),
    ],
)
def test_import_refuses_what_is_not_a_model(env: dict[str, str], isolated: Path, content: bytes, message: str) -> None:
    bad = isolated / "bad.gguf"
    bad.write_bytes(content)
    failed = models(env, "import", str(bad), ok=False)
    assert message in failed.stderr and "fix:" in failed.stderr
    assert user_catalog(isolated) == {}


def test_list_and_show_human_output(env: dict[str, str]) -> None:
    table = models(env, "list").stdout.splitlines()
    assert table[0].split() == ["ID", "ALIASES", "SIZE", "QUANT", "STATUS"]
    assert any(line.startswith("smollm2-135m-instruct") and line.endswith("downloaded") for line in table)
    shown = models(env, "show", "smollm2-135m-instruct").stdout
    for part in ("architecture  llama", "parameters    134.5M", "quantization  Q4_1", "chat template chatml"):
        assert part in shown
    missing = models(env, "show", "qwen2.5-3b-instruct").stdout
    assert "missing: localsample models pull qwen2.5-3b-instruct" in missing
    assert "no model 'gpt-9'" in models(env, "show", "gpt-9", ok=False).stderr


def test_an_empty_catalog_lists_a_friendly_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from localsample import manage
    from localsample.cli import app

    monkeypatch.setattr(manage, "rows", lambda runtime: [])
    runner = CliRunner()
    assert "No models in the catalog" in runner.invoke(app, ["models", "list"]).stdout
    assert json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout) == []
