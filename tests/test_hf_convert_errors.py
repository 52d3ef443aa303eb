"""Bad input to `smoe import` and `smoe export`: every case ends in exit status 2 with one error
line naming the file and the problem (never a traceback), and nothing on disk; a tokenizer smoe
cannot use is left out of an import with a note instead."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from test_hf_convert import (build, config, moe, nothing_written,  # noqa: E402
                             one_line_error, write_run)

from smoe.cli import main  # noqa: E402
from smoe.data.tokenizer import ByteTokenizer  # noqa: E402
from smoe.hf.convert import export_hf, import_hf  # noqa: E402
from smoe.hf.files import read_safetensors  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

CFG = config(vocab_size=257, moe=moe())          # exports as mixtral


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An smoe run with a byte tokenizer, and its export (one file, and sharded)."""
    root = tmp_path_factory.mktemp("source")
    run = write_run(root / "run", build(CFG), ByteTokenizer())
    export_hf(run, root / "hf")
    export_hf(run, root / "sharded", max_shard_bytes=30_000)
    return root


def copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def edit_tensors(path, change):
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def foreign(data):
    """A config.json not written by smoe (import must go by the HF fields alone)."""
    data.pop("smoe_config")


def first_shard(hf):
    return sorted(hf.glob("model-*.safetensors"))[0]


WEIGHTS = "model.safetensors"
E0 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"

#: name -> (what to break in a copy of the HF folder, the folder ("hf"/"sharded"), the error)
IMPORT_CASES = {
    "empty safetensors": (lambda d: (d / WEIGHTS).write_bytes(b""), "hf",
                          r"model\.safetensors' is empty"),
    "truncated safetensors": (lambda d: truncate(d / WEIGHTS), "hf",
                              r"model\.safetensors' is truncated or not a safetensors file"),
    "truncated shard": (lambda d: truncate(first_shard(d), 0.9), "sharded",
                        r"model-00001-of-\d+\.safetensors' is truncated"),
    "no weights": (lambda d: (d / WEIGHTS).unlink(), "hf", "has no model.safetensors"),
    "index names a missing shard": (lambda d: first_shard(d).unlink(), "sharded",
                                    r"index\.json' names shard\(s\) that are not in the folder: "
                                    r"model-00001"),
    "index not JSON": (lambda d: (d / "model.safetensors.index.json").write_text("{'a':"),
                       "sharded", r"index\.json' is not valid JSON"),
    "index without weight_map": (
        lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'),
        "sharded", "has no weight_map"),
    "index lists an absent tensor": (
        lambda d: edit_json(d / "model.safetensors.index.json", lambda j: j["weight_map"].update(
            {"model.ghost.weight": sorted(j["weight_map"].values())[0]})),
        "sharded", "lists tensors its shards do not hold: model.ghost.weight"),
    "config not JSON": (lambda d: (d / "config.json").write_text('{"model_type": "mixtral",'),
                        "hf", r"config\.json' is not valid JSON"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "hf",
                      "holds a JSON list, not an object"),
    "config without model_type": (lambda d: edit_json(d / "config.json",
                                                      lambda j: j.pop("model_type")),
                                  "hf", "model_type is missing: smoe imports llama, "
                                        "qwen3, mixtral"),
    "unknown model_type": (lambda d: edit_json(d / "config.json",
                                               lambda j: j.update(model_type="bert")),
                           "hf", "model_type 'bert': smoe imports llama, .*gpt_oss"),
    "field of the wrong type": (lambda d: edit_json(d / "config.json",
                                                    lambda j: j.update(hidden_size="wide")),
                                "hf", "does not fit transformers' mixtral config: .*expected int, "
                                      "got str"),
    "zero heads": (lambda d: edit_json(d / "config.json",
                                       lambda j: (foreign(j), j.update(num_attention_heads=0))),
                   "hf", "num_attention_heads=0 in the mixtral config: must be a positive integer"),
    "config has more layers": (lambda d: edit_json(d / "config.json", lambda j: (
        foreign(j), j.update(num_hidden_layers=4))), "hf",
        "config.json and the weights disagree: the HF checkpoint has no tensor "
        "'model.layers.3"),
    "config is wider": (lambda d: edit_json(d / "config.json", lambda j: (
        foreign(j), j.update(hidden_size=64, head_dim=8))), "hf",
        "disagree: .*shape: .*the config implies"),
    "extra tensor": (lambda d: edit_tensors(d / WEIGHTS, lambda s: s.update(
        {"model.layers.0.mlp.extra.weight": torch.zeros(2, 2)})), "hf",
        r"no place in smoe's model \(mixtral table\): model\.layers\.0\.mlp\.extra\.weight"),
    "missing tensor": (lambda d: edit_tensors(d / WEIGHTS, lambda s: s.pop(E0)), "hf",
                       f"has no tensor '{E0}'"),
    "tensor of the wrong rank": (lambda d: edit_tensors(d / WEIGHTS, lambda s: s.update(
        {E0: torch.zeros(24)})), "hf",
        r"experts\.\*\.w1\.weight does not have the shape the config implies"),
    "quantized": (lambda d: edit_json(d / "config.json", lambda j: j.update(
        quantization_config={"quant_method": "mxfp4"})), "hf",
        r"config\.json': quantization_config \(quant_method='mxfp4'\)"),
}


@pytest.mark.parametrize("name", list(IMPORT_CASES))
def test_import_bad_input_is_one_line_and_writes_nothing(tmp_path, source, capsys, name):
    breaks, folder, error = IMPORT_CASES[name]
    hf = copy(source / folder, tmp_path / "hf")
    breaks(hf)
    line = one_line_error(capsys, ["import", str(hf), str(tmp_path / "run")])
    assert re.search(error, line), line
    assert nothing_written(tmp_path)


def test_import_output_folder_problems(tmp_path, source, capsys):
    (tmp_path / "file").write_text("x")
    line = one_line_error(capsys, ["import", str(source / "hf"), str(tmp_path / "file")])
    assert "exists and is not a folder" in line
    line = one_line_error(capsys, ["import", str(source / "hf"), str(tmp_path / "file" / "run")])
    assert "is a file, so" in line
    line = one_line_error(capsys, ["import", str(tmp_path / "absent"), str(tmp_path / "run")])
    assert "does not exist" in line
    line = one_line_error(capsys, ["import", str(tmp_path / "file"), str(tmp_path / "run")])
    assert "is a file, not a Hugging Face model folder" in line
    assert (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failed_import_removes_the_folders_it_created(tmp_path, source):
    hf = copy(source / "hf", tmp_path / "hf")
    edit_tensors(hf / WEIGHTS, lambda s: s.pop(E0))
    with pytest.raises(ValueError):
        import_hf(hf, tmp_path / "a" / "b" / "run")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("text, note", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    ('{"added_tokens": "x"}', "added_tokens is not a list"),
    ('{"added_tokens": [{"id": 300, "content": "<|eos|>"}], "model": {"type": "Nope"}}',
     "smoe cannot load it"),
])
def test_import_skips_a_tokenizer_it_cannot_use_with_a_note(tmp_path, source, capsys, text,
                                                              note):
    hf = copy(source / "hf", tmp_path / "hf")
    (hf / "tokenizer.json").write_text(text)
    assert main(["import", str(hf), str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: none" in out and note in out and "tokenizer.json not imported" in out
    assert not (tmp_path / "run" / "tokenizer.json").exists()
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()


def test_import_skips_a_tokenizer_larger_than_the_vocabulary(tmp_path, source):
    from smoe.data.tokenizer import BPETokenizer

    bpe = BPETokenizer.train(["the cat sat on the mat. " * 20], vocab_size=300,
                             min_frequency=2)
    hf = copy(source / "hf", tmp_path / "hf")
    bpe.save(hf)
    result = import_hf(hf, tmp_path / "run")
    assert result.tokenizer is None
    assert any(f"ids, the model's vocabulary {CFG.vocab_size}" in n for n in result.notes)


# -- export -----------------------------------------------------------------------------------
def broken_run(tmp_path, source, breaks):
    run = copy(source / "run", tmp_path / "run")
    breaks(run)
    return run


EXPORT_CASES = {
    "truncated checkpoint": (lambda r: truncate(r / "checkpoint" / WEIGHTS),
                             r"checkpoint' is damaged \(model\.safetensors is .*truncated"),
    "empty checkpoint": (lambda r: (r / "checkpoint" / WEIGHTS).write_bytes(b""),
                         r"checkpoint' is damaged \(model\.safetensors is empty"),
    "weights of another model": (lambda r: edit_tensors(r / "checkpoint" / WEIGHTS, lambda s: (
        s.pop("layers.0.attn.q_proj.weight"), s.update({"layers.9.x": torch.zeros(1)}),
        s.update({"norm.weight": torch.ones(7)}))),
        r"checkpoint/model\.safetensors' does not match the run's model config: missing: "
        r"layers\.0\.attn\.q_proj\.weight .*unexpected: "
        r"layers\.9\.x .*shape: norm\.weight is \(7,\), the config implies \(32,\)"),
    "tokenizer not JSON": (lambda r: (r / "tokenizer.json").write_text("{"),
                           r"tokenizer\.json' is not valid JSON"),
    "tokenizer a list": (lambda r: (r / "tokenizer.json").write_text("[]"),
                         r"tokenizer\.json' is not a tokenizer: it holds a JSON list"),
    "run config not JSON": (lambda r: (r / "config.json").write_text("{"), "config.json"),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_bad_input_is_one_line_and_writes_nothing(tmp_path, source, capsys, name):
    breaks, error = EXPORT_CASES[name]
    run = broken_run(tmp_path, source, breaks)
    line = one_line_error(capsys, ["export", str(run), "--to", "hf", str(tmp_path / "out")])
    assert re.search(error, line), line
    assert nothing_written(tmp_path, "out")


def test_export_output_folder_problems(tmp_path, source, capsys):
    (tmp_path / "file").write_text("x")
    run = str(source / "run")
    assert "exists and is not a folder" in one_line_error(
        capsys, ["export", run, "--to", "hf", str(tmp_path / "file")])
    assert "is a file, so" in one_line_error(
        capsys, ["export", run, "--to", "hf", str(tmp_path / "file" / "x" / "out")])
    assert "does not exist" in one_line_error(
        capsys, ["export", str(tmp_path / "absent"), "--to", "hf", str(tmp_path / "out")])
    assert "is a file, not an smoe run folder" in one_line_error(
        capsys, ["export", str(tmp_path / "file"), "--to", "hf", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_read_safetensors_names_the_file(tmp_path, source):
    """The reader other parts of smoe can use for a run's checkpoint."""
    good = read_safetensors(source / "run" / "checkpoint" / WEIGHTS)
    assert torch.equal(good["norm.weight"], build(CFG).state_dict()["norm.weight"])
    bad = tmp_path / WEIGHTS
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"model\.safetensors' is truncated or not a safetensors"):
        read_safetensors(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_safetensors(tmp_path / "absent.safetensors")


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, source, capsys, monkeypatch):
    """A write that fails half way (ENOSPC injected after the real file is written) is one
    line, and the partial files are removed, for export and for import."""
    import errno

    import safetensors.torch

    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    import smoe.train.checkpoint as checkpoint  # import writes the run's checkpoint with it

    monkeypatch.setattr(checkpoint, "save_file", full_disk, raising=False)
    line = one_line_error(capsys, ["export", str(source / "run"), "--to", "hf",
                                   str(tmp_path / "out")])
    assert "failed (No space left on device): nothing was written" in line
    line = one_line_error(capsys, ["import", str(source / "hf"), str(tmp_path / "run")])
    assert "failed (No space left on device)" in line
    assert list(tmp_path.iterdir()) == []
