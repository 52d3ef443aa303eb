"""The README's snippets run as written.

Every ```python block is executed (each in a fresh namespace); a block preceded by an HTML
comment ``<!-- no-test: REASON -->`` is skipped, and must give a reason. The ```toml block is
read by the same code as ``smoe train --config`` and must build a valid model and training
config. Cheap ```bash lines (``smoe route``, ``smoe --help``) run through ``smoe.cli.main``.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from smoe.cli import main as cli_main

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?P<skip><!-- no-test:(?P<reason>[^>]*)-->\s*\n)?```(?P<lang>\w*)\n"
                    r"(?P<body>.*?)\n```", re.S)


def _blocks(lang: str) -> list[tuple[int, str, str | None]]:
    """(line number, body, skip reason) of the README's ``lang`` blocks."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        if m.group("lang") == lang:
            line = text.count("\n", 0, m.start("body")) + 1
            reason = m.group("reason").strip() if m.group("skip") else None
            out.append((line, m.group("body"), reason))
    return out


PYTHON = _blocks("python")


def test_the_readme_has_snippets_to_test():
    assert len(PYTHON) >= 3 and _blocks("toml") and _blocks("bash")
    for line, _, reason in PYTHON:
        assert reason != "", f"README line {line}: a no-test marker needs a reason"


@pytest.mark.parametrize("line,body,reason", PYTHON, ids=[f"line{b[0]}" for b in PYTHON])
def test_python_block_runs(line, body, reason, capsys):
    if reason is not None:
        pytest.skip(f"README line {line}: {reason}")
    exec(compile(body, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    if "print(e)" in body:  # the refused-config example prints the error its comment shows
        shown = re.search(r"print\(e\)\s*#\s*(.*)", body).group(1).strip()
        assert capsys.readouterr().out.strip() == shown


def test_toml_block_is_a_valid_run_config():
    from smoe.cli.options import CONFIG_SECTIONS
    from smoe.train import TrainConfig
    from smoe.train.run import model_config_for

    ((line, body, _),) = _blocks("toml")
    sections = tomllib.loads(body)
    assert set(sections) <= set(CONFIG_SECTIONS)
    preset = sections["model"].get("preset", "tiny-moe")
    cfg = model_config_for(preset, 257, 128, overrides=sections)
    for key, value in sections["moe"].items():
        assert getattr(cfg.moe, key) == value
    assert cfg.num_layers == sections["model"]["num_layers"]
    TrainConfig.from_dict(sections["train"])


def _cheap_bash_lines() -> list[str]:
    lines = []
    for _, body, _ in _blocks("bash"):
        for raw in body.splitlines():
            command = raw.split("#")[0].strip()
            if command.startswith(("smoe route", "smoe --help", "smoe train --help",
                                   "smoe plan mixtral", "smoe plan deepseek")):
                lines.append(command)
    return lines


@pytest.mark.parametrize("command", _cheap_bash_lines())
def test_cheap_bash_line_runs(command, capsys, tmp_path, monkeypatch):
    # In an empty folder: a line that writes (``--out domain.safetensors``) leaves nothing in
    # the checkout and finds nothing from an earlier run there.
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)[1:]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_readme_names_only_what_exists():
    import importlib

    text = README.read_text(encoding="utf-8")
    for module in sorted(set(re.findall(r"\bsmoe\.([a-z_]+)\b", text))):
        if module in ("hf",):
            continue
        importlib.import_module(f"smoe.{module}")  # e.g. no smoe.serve until it exists
    for path in re.findall(r"^src/(smoe/\S+)", text, re.M):
        assert (README.parent / "src" / path).exists(), path
