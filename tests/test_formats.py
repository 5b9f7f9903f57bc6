"""The safetensors reader and writer against the safetensors library, and hostile headers."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert import merge
from formats.errors import ConvertError
from formats.safetensors_file import DTYPES, read_header, read_tensor
from formats.writer import PlannedTensor, ShardWriter, parse_size
from tests.helpers import load_output, read_config

transformers_hub = pytest.importorskip("transformers.utils.hub")


@pytest.mark.parametrize("size", ["5GB", "5Gb", "500MB", "10KB", "3kb", "2GiB", "7MiB", "1KiB", 12345])
def test_parse_size_like_transformers(size):
    assert parse_size(size) == transformers_hub.convert_file_size_to_int(size)


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError):
        parse_size("five gigs")


def random_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in DTYPES.items():
        if dtype in (torch.uint16, torch.uint32, torch.uint64):
            continue  # the safetensors library's torch API does not save these
        x = torch.randn(7, 5, generator=g) * 10
        out[f"t.{name}"] = x.to(dtype)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    out["vector"] = torch.arange(11, dtype=torch.int64)
    return out


def test_reader_matches_safetensors(tmp_path):
    tensors = random_tensors()
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    infos, metadata = read_header(tmp_path / "a.safetensors")
    assert metadata == {"format": "pt"} and set(infos) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(read_tensor(infos[name]), t), name
        if t.dim() == 2 and t.shape[0] > 3:
            assert torch.equal(read_tensor(infos[name], 2, 5), t[2:5]), name


def test_writer_output_loads_in_safetensors(tmp_path):
    tensors = random_tensors()
    planned = [PlannedTensor(n, {v: k for k, v in DTYPES.items()}[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, planned, max_shard_size=200)
    for name, t in tensors.items():
        if t.dim() == 2 and t.shape[0] > 2:  # in two chunks, the second first
            writer.write(name, t[2:], offset=t[:2].nbytes)
            writer.write(name, t[:2])
        else:
            writer.write(name, t)
    files = writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len(files) > 3
    for name, t in tensors.items():
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(name), t), name


def test_writer_refuses_overlaps_and_reports_missing_bytes(tmp_path):
    writer = ShardWriter(tmp_path, [PlannedTensor("a", "F32", (4,)), PlannedTensor("b", "F32", (2,))], 1 << 20)
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="written twice"):
        writer.write("a", torch.zeros(2), offset=4)
    with pytest.raises(RuntimeError, match="outside the tensor"):
        writer.write("b", torch.zeros(3))
    writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="tensor 'a' got 8 of 16 bytes"):
        writer.finish()


def write_raw(path, header: dict, data: bytes = b"", header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


@pytest.mark.parametrize(
    "header,data,needle",
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "invalid data_offsets"),
    ],
)
def test_hostile_headers(tmp_path, header, data, needle):
    write_raw(tmp_path / "x.safetensors", header, data)
    with pytest.raises(ConvertError, match=needle) as err:
        read_header(tmp_path / "x.safetensors")
    assert "x.safetensors" in str(err.value) and "tensor 'a'" in str(err.value)


def test_duplicate_names_and_huge_header(tmp_path):
    raw = (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
        b'"data_offsets": [0, 4]}}'
    )
    (tmp_path / "d.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(ConvertError, match="duplicate tensor name 'a'"):
        read_header(tmp_path / "d.safetensors")
    write_raw(tmp_path / "h.safetensors", {}, header_len=2**40)
    with pytest.raises(ConvertError, match="header claims"):
        read_header(tmp_path / "h.safetensors")


def test_untouched_tensors_are_byte_copies(tiny_llama, tmp_path):
    base, adapter = tiny_llama
    merge(base, adapter, tmp_path / "out", device="cpu")
    src, _ = read_header(base / "model.safetensors")
    out, _ = read_header(tmp_path / "out" / "model.safetensors")
    raw_in, raw_out = (base / "model.safetensors").read_bytes(), (tmp_path / "out" / "model.safetensors").read_bytes()
    untouched = [n for n in src if "proj" not in n]
    assert untouched
    for name in untouched:
        a, b = src[name], out[name]
        assert raw_in[a.offset : a.offset + a.nbytes] == raw_out[b.offset : b.offset + b.nbytes], name


def test_no_adapter_recasts_and_reshards(tiny_llama, tmp_path):
    base, _ = tiny_llama
    result = merge(base, None, tmp_path / "out", dtype="bf16", max_shard_size="30KB")
    assert result.merged == 0 and len([f for f in result.files if f.endswith(".safetensors")]) > 1
    ours, ref = load_output(tmp_path / "out"), load_file(base / "model.safetensors")
    assert all(torch.equal(ours[k], ref[k].to(torch.bfloat16)) for k in ref)
    assert read_config(tmp_path / "out")["dtype" if "dtype" in read_config(base) else "torch_dtype"] == "bfloat16"


def test_side_files_and_model_card(tiny_llama, tmp_path):
    base, adapter = tiny_llama
    (base / "tokenizer_config.json").write_text('{"from": "base"}')
    (base / "chat_template.jinja").write_text("{{ base }}")
    (adapter / "tokenizer_config.json").write_text('{"from": "adapter"}')
    (base / "notes.txt").write_text("not copied")
    merge(base, adapter, tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    assert (out / "chat_template.jinja").read_text() == "{{ base }}"
    assert (out / "generation_config.json").exists() and not (out / "notes.txt").exists()
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card and "base_model:" in card and "adapter" in card


def test_bin_base_with_wide_and_integer_tensors_is_rewritten(tmp_path):
    """A .bin base (no byte copies possible) with float64 and int64 tensors goes through the compute path."""
    state = {"a.weight": torch.randn(300, 7, dtype=torch.float64), "b.ids": torch.arange(1000, dtype=torch.int64)}
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match="config.json: missing"):
        merge(tmp_path / "bin", None, tmp_path / "out", device="cpu")
    (tmp_path / "bin" / "config.json").write_text('{"model_type": "none"}')
    merge(tmp_path / "bin", None, tmp_path / "out", device="cpu", chunk_size=4 * 7 * 10)
    out = load_output(tmp_path / "out")
    assert out.keys() == state.keys() and all(torch.equal(out[k], state[k]) for k in state)
