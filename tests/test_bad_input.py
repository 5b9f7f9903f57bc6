"""Bad input: a one-line error naming the file (and tensor), exit code 2, nothing at OUT, inputs untouched."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from convert.cli import main
from formats.errors import ConvertError
from tests.conftest import TINY, make_adapter, make_base, transformers


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def run_failing(tmp_path: Path, base: Path, adapter: Path | None, out: Path | None = None, *extra: str) -> str:
    """Run `convert merge`, expect exit 2 and a one-line error; check nothing was written or modified."""
    out = out or tmp_path / "out"
    inputs = {p: tree_digest(p) for p in (base, adapter) if p is not None and p.is_dir()}
    out_before = tree_digest(out) if out.is_dir() else None
    args = ["merge", "--base", str(base), "--out", str(out), *extra]
    if adapter is not None:
        args += ["--adapter", str(adapter)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert (tree_digest(out) if out.is_dir() else None) == out_before
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary output left behind"
    assert {p: tree_digest(p) for p in inputs} == inputs, "an input was modified"
    return message


@pytest.fixture
def llama(tmp_path):
    base = make_base(tmp_path / "base", "llama")
    return base, make_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear")


def test_adapter_module_not_in_base(llama, tmp_path):
    base, adapter = llama
    small = tmp_path / "small"
    cfg = TINY["llama"]()
    cfg.num_hidden_layers = 1
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(small)
    message = run_failing(tmp_path, small, adapter)
    assert "adapter_model.safetensors" in message and "model.layers.1." in message
    assert "does not exist in the base model" in message


def test_shape_mismatch_names_both_shapes(llama, tmp_path):
    base, adapter = llama
    cfg = TINY["llama"]()
    cfg.intermediate_size = 40
    other = tmp_path / "other"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    message = run_failing(tmp_path, other, adapter)
    assert "shape mismatch" in message and "'model.layers.0.mlp." in message
    assert ("[32, 40]" in message and "[32, 48]" in message) or ("[40, 32]" in message and "[48, 32]" in message)


def test_truncated_safetensors(llama, tmp_path):
    base, adapter = llama
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) - 100])
    message = run_failing(tmp_path, base, adapter)
    assert "model.safetensors" in message and "truncated" in message and "tensor '" in message


@pytest.mark.parametrize(
    "payload", [b"\x00\x01", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx", (2**62).to_bytes(8, "little") + b"{}"]
)
def test_corrupt_safetensors_header(llama, tmp_path, payload):
    base, adapter = llama
    (adapter / "adapter_model.safetensors").write_bytes(payload)
    message = run_failing(tmp_path, base, adapter)
    assert "adapter_model.safetensors" in message


def test_missing_adapter_config(llama, tmp_path):
    base, adapter = llama
    (adapter / "adapter_config.json").unlink()
    assert "adapter_config.json: missing" in run_failing(tmp_path, base, adapter)


def test_out_dir_not_empty_needs_overwrite(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert "not empty" in run_failing(tmp_path, base, adapter, out)
    result = CliRunner().invoke(
        main, ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("where", ["base", "base/sub", "adapter", "."])
def test_out_dir_inside_or_around_an_input(llama, tmp_path, where):
    base, adapter = llama
    out = tmp_path / where
    message = run_failing(tmp_path, base, adapter, out, "--overwrite")
    assert "input directory" in message


def test_other_adapter_types_are_named(llama, tmp_path):
    base, adapter = llama
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert "'IA3' is not supported" in run_failing(tmp_path, base, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert "DoRA" in run_failing(tmp_path, base, adapter)


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_refused(llama, tmp_path, capsys):
    base, adapter = llama
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    message = run_failing(tmp_path, base, adapter)
    assert "adapter_model.bin" in message and "weights_only" in message
    assert "code ran" not in capsys.readouterr().out


def test_index_pointing_outside_the_model(llama, tmp_path):
    base, adapter = llama
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../adapter/adapter_model.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    message = run_failing(tmp_path, base, adapter)
    assert "model.embed_tokens.weight" in message and "outside the model directory" in message


def test_failure_while_writing_leaves_nothing(llama, tmp_path, monkeypatch):
    base, adapter = llama
    import formats.writer

    calls = []

    def fail_on_third(self, name, data, offset=0):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(self, name, data, offset)

    original = formats.writer.ShardWriter.write
    monkeypatch.setattr(formats.writer.ShardWriter, "write", fail_on_third)
    from convert import merge

    with pytest.raises(ConvertError, match="No space left on device.*rerun with --resume"):
        merge(base, adapter, tmp_path / "out")
    # Nothing at OUT; the partial directory is kept for --resume but holds no config.json, no finished model.
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.glob(".out.*")] == [".out.partial"]
    assert not (tmp_path / ".out.partial" / "model" / "config.json").exists()


def test_adapter_config_without_rank(llama, tmp_path):
    base, adapter = llama
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["r"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "'r' must be a positive number" in run_failing(tmp_path, base, adapter)
