"""Bad input: a one-line error naming the file (and tensor), exit code 2, nothing at OUT, inputs untouched."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from convert.cli import main
from formats.errors import ConvertError
from tests.helpers import TINY, make_adapter, make_base, run_failing, transformers


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


@pytest.mark.parametrize("which", ["adapter", "base"])
def test_pickle_with_code_is_refused(llama, tmp_path, capsys, which):
    base, adapter = llama
    directory, name = (adapter, "adapter_model") if which == "adapter" else (base, "pytorch_model")
    (directory / f"{'adapter_' if which == 'adapter' else ''}model.safetensors").unlink()
    (directory / f"{name}.bin").write_bytes(pickle.dumps({"x": Evil()}))
    message = run_failing(tmp_path, base, adapter)
    assert f"{name}.bin" in message and "weights_only" in message
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


# ---------------------------------------------------------------- hostile files
# Checkpoints come from strangers: every lie below must end in one line naming the file (and tensor),
# exit 2, nothing written, and no code run.


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header as an ordered dict, data bytes) of a real safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def lie_in_adapter_header(adapter: Path, lie) -> str:
    """Rewrite the adapter's header with ``lie(header)`` applied; return the name of the tensor lied about."""
    path = adapter / "adapter_model.safetensors"
    header, data = split_safetensors(path)
    name = sorted(k for k in header if k != "__metadata__")[0]
    text = lie(header, name, data)
    if isinstance(text, tuple):
        text, data = text
    write_safetensors(path, text if isinstance(text, str) else json.dumps(header), data)
    return name


def _offsets_past_end(h, name, data):
    h[name]["data_offsets"] = [len(data) - 4, len(data) + 60]


def _offsets_overlap(h, name, data):
    def span(k):
        return h[k]["data_offsets"][1] - h[k]["data_offsets"][0]

    other = sorted(k for k in h if k not in ("__metadata__", name) and span(k) == span(name))[0]
    h[name]["data_offsets"] = list(h[other]["data_offsets"])


def _shape_wrong(h, name, data):
    h[name]["shape"] = [h[name]["shape"][0] + 1, *h[name]["shape"][1:]]


def _dtype_wrong(h, name, data):
    h[name]["dtype"] = "F64" if h[name]["dtype"] != "F64" else "F32"


def _dtype_unknown(h, name, data):
    h[name]["dtype"] = "C64"


def _shape_bool(h, name, data):
    h[name]["shape"] = [True, *h[name]["shape"][1:]] if h[name]["shape"][0] == 1 else [True]


def _negative_offset(h, name, data):
    h[name]["data_offsets"] = [-8, h[name]["data_offsets"][1]]


def _duplicate_name(h, name, data):
    entries = [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in h.items()]
    return "{" + ",".join([*entries, f"{json.dumps(name)}:{json.dumps(h[name])}"]) + "}"


def _nested_deep(h, name, data):
    return '{"__metadata__":' + "[" * 100_000 + "]" * 100_000 + "}"


def _metadata_not_strings(h, name, data):
    h["__metadata__"] = {"format": {"evil": 1}}


HEADER_LIES = {
    "data past the end of the file": (_offsets_past_end, "truncated or corrupt"),
    "overlapping data offsets": (_offsets_overlap, "overlaps tensor"),
    "negative data offset": (_negative_offset, "invalid data_offsets"),
    "shape does not match byte count": (_shape_wrong, "needs"),
    "dtype does not match byte count": (_dtype_wrong, "needs"),
    "unknown dtype": (_dtype_unknown, "unsupported dtype 'C64'"),
    "boolean in shape": (_shape_bool, "invalid shape"),
    "duplicate tensor name": (_duplicate_name, "duplicate tensor name"),
    "header nested 100k deep": (_nested_deep, "nested too deeply"),
    "metadata not strings": (_metadata_not_strings, "__metadata__"),
}


@pytest.mark.parametrize("lie", HEADER_LIES, ids=list(HEADER_LIES))
def test_lying_safetensors_header(llama, tmp_path, lie):
    base, adapter = llama
    make_lie, expected = HEADER_LIES[lie]
    name = lie_in_adapter_header(adapter, make_lie)
    message = run_failing(tmp_path, base, adapter)
    assert "adapter_model.safetensors" in message and expected in message, message
    if lie not in ("header nested 100k deep", "metadata not strings"):
        assert name in message or "duplicate" in message, message


def test_header_length_past_end_of_file(llama, tmp_path):
    base, adapter = llama
    shard = base / "model.safetensors"
    size = shard.stat().st_size
    shard.write_bytes((size + 1000).to_bytes(8, "little") + shard.read_bytes()[8:])
    message = run_failing(tmp_path, base, adapter)
    assert "model.safetensors" in message and "runs past the end" in message


@pytest.mark.parametrize("where", ["absolute", "symlink"])
def test_index_escaping_the_model_dir(llama, tmp_path, where):
    base, adapter = llama
    if where == "absolute":
        name = str((adapter / "adapter_model.safetensors").resolve())
    else:
        name = "escape.safetensors"
        (base / name).symlink_to(adapter / "adapter_model.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": name}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    message = run_failing(tmp_path, base, adapter)
    assert "model.norm.weight" in message and "outside the model directory" in message


def test_single_file_symlink_leaving_the_model_dir(llama, tmp_path):
    base, adapter = llama
    elsewhere = tmp_path / "elsewhere.safetensors"
    (base / "model.safetensors").rename(elsewhere)
    (base / "model.safetensors").symlink_to(elsewhere)
    assert "leaves the model directory" in run_failing(tmp_path, base, adapter)


def test_hugging_face_cache_layout_is_accepted(llama, tmp_path):
    """snapshots/<rev>/<file> -> ../../blobs/<sha>: links that leave the snapshot, but stay in the repo cache."""
    base, adapter = llama
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in base.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    result = CliRunner().invoke(
        main, ["merge", "--base", str(snapshot), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "-q"]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_adapter_values(llama, tmp_path, value):
    base, adapter = llama
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    name = sorted(n for n in tensors if "lora_B" in n)[1]
    tensors[name][1, 2] = float(value)
    save_file(tensors, path, metadata={"format": "pt"})
    message = run_failing(tmp_path, base, adapter)
    assert f"tensor '{name}': 1 NaN/Inf value(s)" in message and "--allow-nonfinite" in message
    result = CliRunner().invoke(
        main,
        ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--allow-nonfinite"],
    )
    assert result.exit_code == 0 and "warning: " in result.stderr and name in result.stderr


def test_unknown_dtype_in_a_pickle(llama, tmp_path):
    base, adapter = llama
    (adapter / "adapter_model.safetensors").unlink()
    evil = {"base_model.model.x.lora_A.weight": torch.zeros(2, 2, dtype=torch.complex64)}
    torch.save(evil, adapter / "adapter_model.bin")
    message = run_failing(tmp_path, base, adapter)
    assert "adapter_model.bin" in message and "base_model.model.x.lora_A.weight" in message and "complex64" in message


def test_integer_lora_weights_are_refused(llama, tmp_path):
    base, adapter = llama
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    name = sorted(n for n in tensors if "lora_A" in n)[0]
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, path)
    message = run_failing(tmp_path, base, adapter)
    assert f"tensor '{name}': dtype I8 is not supported for LoRA weights" in message


def test_lora_bias_of_the_wrong_shape(tmp_path):
    base = make_base(tmp_path / "base", "qwen2")
    adapter = make_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj"])
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    name = sorted(n for n in tensors if n.endswith("lora_B.bias"))[0]
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, path)
    message = run_failing(tmp_path, base, adapter)
    assert f"tensor '{name}': shape mismatch" in message


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--chunk-size", "0"], "--chunk-size 0: must be positive"),
        (["--max-shard-size", "0"], "--max-shard-size 0: must be positive"),
        (["--train-quant", "nf4"], "--train-quant: only used with --merge-into dequantized"),
    ],
)
def test_option_values_that_mean_nothing(llama, tmp_path, extra, expected):
    base, adapter = llama
    assert expected in run_failing(tmp_path, base, adapter, None, *extra)


@pytest.mark.parametrize("where", [".", ".."])
def test_out_must_name_a_directory(llama, tmp_path, monkeypatch, where):
    base, adapter = llama
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    message = run_failing(tmp_path, base, adapter, Path(where))
    assert "name the output directory" in message
    assert not list((tmp_path / "empty").iterdir()) and not list(tmp_path.glob(".*partial*"))
