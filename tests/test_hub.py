"""Hub inputs and pushes, with the real huggingface_hub client against a Hub look-alike on loopback.

The oracle is a local merge of the same files: what comes from or goes to the
Hub must be byte-identical to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from huggingface_hub import constants
from huggingface_hub.utils import _http, close_session

import formats.hub
from convert.cli import main
from formats.writer import PlannedTensor, ShardWriter
from tests.helpers import ROOT, journaled, make_adapter, make_base
from tests.hub_server import FakeHub

merge_module = sys.modules["convert.commands.merge"]  # the package's `merge` attribute is the function
TOKEN = "hf_test_secret_token_0123456789"
SHARD = "30KB"  # tiny llama (~100 KB in fp32): several shards in and out
FROM_HUB = ("--base", "org/base", "--adapter", "org/adapter", "--max-shard-size", SHARD)
GITATTRIBUTES = {".gitattributes": b"*.safetensors filter=lfs\n"}  # what a new repo on the Hub holds


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh Hub look-alike; the client is pointed at it, with its cache and token file under tmp_path."""
    server = FakeHub(tokens={TOKEN: "alice"}).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain LFS uploads: the look-alike has no Xet
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda s: None))  # retries without the backoff waits
    close_session()
    yield server
    close_session()
    server.stop()


@pytest.fixture
def models(tmp_path, hub):
    """A sharded tiny Llama and a LoRA adapter, on disk and as the Hub repos org/base and org/adapter."""
    base = make_base(tmp_path / "base", "llama", max_shard_size=SHARD)
    adapter = make_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear")
    assert len(list(base.glob("model-*.safetensors"))) >= 3
    for repo, path in (("org/base", base), ("org/adapter", adapter)):
        hub.add_repo(repo, {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()})
    return base, adapter


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, ["merge", *args])
    assert result.exit_code == code, (result.output, result.exception)
    return result.stderr.strip()


def merge_locally(base: Path, adapter: Path, out: Path) -> dict[str, bytes]:
    run("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--max-shard-size", SHARD, "-q")
    return tree(out)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def without_card(files: dict[str, bytes]) -> dict[str, bytes]:
    """All but README.md, whose card names the inputs (repo ids here, directory names for a local merge)."""
    return {k: v for k, v in files.items() if k != "README.md"}


def snapshot(tmp_path: Path, repo: str) -> Path:
    (directory,) = (tmp_path / "hf-cache" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    return directory


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_merge_from_repo_ids_equals_local_merge(models, hub, tmp_path):
    base, adapter = models
    local = merge_locally(base, adapter, tmp_path / "local")
    run(*FROM_HUB, "--out", str(tmp_path / "out"))
    remote = tree(tmp_path / "out")
    card = remote["README.md"].decode()
    assert without_card(remote) == without_card(local) and len(local) > 4
    assert "base_model: org/base" in card and "base_model_relation: merge" in card and "org/adapter" in card
    assert "library_name: transformers" in card and hub.files("org/base")  # the card names repos, not paths
    # Only the files a merge needs were fetched; each shard's header by a range request, then the shard once.
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    for name in shards:
        assert len(hub.requests("GET", f"/org/base/resolve/.*/{name}$", ranged=True)) == 1
        assert len(hub.requests("GET", f"/org/base/resolve/.*/{name}$", ranged=False)) == 1
    assert not hub.requests("GET", r"/org/adapter/resolve/.*/README\.md$")
    kept = sorted(p.name for p in snapshot(tmp_path, "org/base").glob("model-*.safetensors"))
    assert kept == shards  # the Hub cache is used as usual: downloads stay there by default


def test_shard_k_plus_1_downloads_while_k_merges_and_no_keep_downloads_deletes_them(models, hub, tmp_path, monkeypatch):
    base, adapter = models
    local = merge_locally(base, adapter, tmp_path / "local")
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    present, overlapped = [], []
    real_run_plan = merge_module.run_plan

    def observed_run_plan(stage, *args, **kwargs):
        directory = snapshot(tmp_path, "org/base")
        present.append(sorted(p.name for p in directory.glob("model-*.safetensors")))
        (current,) = {t.source.path.name for t in stage}
        following = shards[shards.index(current) + 1 :]
        if following:  # the next shard's download starts while this one has not been merged yet
            pattern = f"/resolve/.*/{following[0]}$"
            overlapped.append(wait_for(lambda: hub.requests("GET", pattern, ranged=False)))
        return real_run_plan(stage, *args, **kwargs)

    monkeypatch.setattr(merge_module, "run_plan", observed_run_plan)
    out = tmp_path / "out"
    run(*FROM_HUB, "--out", str(out), "--no-keep-downloads", "--device", "cpu")  # the CPU executor it observes
    assert tree(out).keys() == local.keys() and without_card(tree(out)) == without_card(local)
    assert len(present) == len(shards) and overlapped == [True] * (len(shards) - 1)
    assert max(len(p) for p in present) <= 2  # disk holds the shard being merged and the next one
    directory = snapshot(tmp_path, "org/base")
    assert not list(directory.glob("model-*.safetensors")), "consumed shards left in the cache"
    assert (directory / "config.json").is_file()
    blobs = [p.stat().st_size for p in (directory.parents[1] / "blobs").iterdir()]
    assert sum(blobs) < min((base / s).stat().st_size for s in shards)  # shard blobs deleted too


def test_writer_reports_each_shard_when_its_last_byte_is_written(tmp_path):
    import torch

    done = []
    tensors = [PlannedTensor(n, "F32", (4,)) for n in "abcd"]
    writer = ShardWriter(tmp_path, tensors, 32, on_shard_done=done.append)  # two tensors a shard
    writer.write("b", torch.ones(4))
    writer.write("a", torch.ones(2))
    assert done == []
    writer.write("a", torch.ones(2), offset=8)
    assert done == ["model-00001-of-00002.safetensors"]
    writer.write("c", torch.ones(4))
    writer.write("d", torch.ones(4))
    assert done == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    writer.finish()
    assert len(done) == 2


def test_push_uploads_each_shard_and_commits_once(models, hub, tmp_path):
    base, adapter = models
    out = tmp_path / "out"
    push = ("--push-to-hub", "alice/merged", "--private", "--token", TOKEN, "--commit-message", "merged by a test")
    run("--base", str(base), "--adapter", str(adapter), "--out", str(out), "--max-shard-size", SHARD, *push)
    files = tree(out)
    assert hub.files("alice/merged") == {**files, **GITATTRIBUTES}
    shards = [n for n in files if n.endswith(".safetensors")]
    assert len(shards) >= 3 and len(hub.requests("PUT", "/lfs-upload/")) == len(shards)
    repo = hub.repos["alice/merged"]
    assert len(hub.requests("POST", "/commit/")) == 1 and len(repo.commits) == 2
    assert repo.private and repo.messages[repo.branches["main"]] == "merged by a test"


def test_push_to_branch_with_token_from_environment(models, hub, tmp_path, monkeypatch):
    base, adapter = models
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    inputs = ("--base", str(base), "--adapter", str(adapter))
    run(*inputs, "--out", str(out), "--push-to-hub", "alice/m", "--push-revision", "v1")
    assert hub.files("alice/m", "v1") == {**tree(out), **GITATTRIBUTES}
    assert set(hub.files("alice/m", "main")) == {".gitattributes"}


def test_upload_cut_mid_way_then_retry_uploads_only_the_rest(models, hub, tmp_path):
    base, adapter = models
    out = tmp_path / "out"
    args = [*FROM_HUB, "--out", str(out), "--push-to-hub", "alice/merged", "--token", TOKEN]
    hub.uploads_before_outage = 1  # the first shard goes through, the network fails during the second
    message = run(*args, code=2)
    assert message.startswith("error: alice/merged (uploading model-") and "\n" not in message
    assert "cannot reach the Hub" in message and "run the same command again" in message
    assert TOKEN not in message and not out.exists() and not list(tmp_path.glob(".out.*"))
    assert set(hub.files("alice/merged")) == {".gitattributes"}, "a failed push must not commit anything"
    assert len(hub.lfs) == 1
    first_run_puts = len(hub.requests("PUT", "/lfs-upload/"))
    assert first_run_puts > 2  # the cut upload was retried by the client before giving up

    hub.uploads_before_outage = None
    (kept,) = hub.lfs
    run(*args)
    retried = hub.requests("PUT", "/lfs-upload/")[first_run_puts:]
    files = tree(out)
    shards = [n for n in files if n.endswith(".safetensors")]
    assert len(retried) == len(shards) - 1 and f"/lfs-upload/{kept}" not in retried
    assert hub.files("alice/merged") == {**files, **GITATTRIBUTES}
    local = merge_locally(base, adapter, tmp_path / "local")
    assert without_card(files) == without_card(local)


@pytest.mark.parametrize(
    "case, args, expected",
    [
        ("unknown repo", ["--base", "org/missing"], "org/missing: no such local directory, and no such repository"),
        ("unknown revision", ["--base", "org/base", "--revision", "nope"], "org/base@nope: revision not found"),
        ("gated, no token", ["--base", "org/gated"], "org/gated/config.json: gated repository"),
        ("bad token", ["--base", "org/base", "--token", "hf_wrong_" + TOKEN], "org/base: the Hub rejected the token"),
        (
            "bad token on push",
            ["--base", "BASE", "--push-to-hub", "alice/x", "--token", "hf_wrong_" + TOKEN],
            "alice/x: the Hub rejected the token",
        ),
        ("push without token", ["--base", "BASE", "--push-to-hub", "alice/x"], "alice/x: the Hub rejected the token"),
        ("Hub unreachable", ["--base", "org/base", "--token", TOKEN], "org/base: cannot reach the Hub"),
    ],
)
def test_hub_errors_are_one_line_and_never_show_the_token(models, hub, tmp_path, case, args, expected):
    base, adapter = models
    hub.add_repo("org/gated", tree(base), gated=True)
    if case == "Hub unreachable":
        hub.stop()
    out = tmp_path / "out"
    args = [str(base) if a == "BASE" else a for a in args]
    message = run(*args, "--adapter", str(adapter), "--out", str(out), code=2)
    assert message.startswith(f"error: {expected}") and "\n" not in message, message
    assert "hf_wrong" not in message and TOKEN not in message
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    for path in tmp_path.rglob("*"):  # the tool never writes a token anywhere
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_gated_repo_with_token(models, hub, tmp_path):
    base, adapter = models
    hub.add_repo("org/gated", tree(base), gated=True)
    out = tmp_path / "out"
    run(
        "--base", "org/gated", "--adapter", str(adapter), "--out", str(out), "--token", TOKEN, "--max-shard-size", SHARD
    )
    local = merge_locally(base, adapter, tmp_path / "local")
    assert without_card(tree(out)) == without_card(local)


def test_bin_base_and_adapter_from_repos_pinned_at_a_commit(hub, tmp_path):
    """Pickled checkpoints have no remote header: they are downloaded whole (weights_only) and merged the same."""
    import torch

    from tests.helpers import load_output

    base = make_base(tmp_path / "base", "llama")
    adapter = make_adapter(tmp_path / "adapter", base, safe=False, r=4, lora_alpha=8, target_modules="all-linear")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(load_output(base), legacy / "pytorch_model.bin")
    (legacy / "config.json").write_text((base / "config.json").read_text())
    commit = hub.add_repo("org/legacy", tree(legacy))
    hub._commit("org/legacy", "main", {**tree(legacy), "config.json": b"not json"})  # main moved on, and broke
    hub.add_repo("org/bin-adapter", tree(adapter))
    local = merge_locally(legacy, adapter, tmp_path / "local")
    out = tmp_path / "out"
    run("--base", f"org/legacy@{commit}", "--adapter", "org/bin-adapter", "--out", str(out), "--max-shard-size", SHARD)
    assert without_card(tree(out)) == without_card(local)
    assert hub.requests("GET", f"/org/legacy/resolve/{commit}/pytorch_model.bin$", ranged=False)


def test_push_files_streams_any_directory(hub, tmp_path):
    """The push API other commands use: a directory and the names of its files as they are completed."""
    from convert.output.push import HubTarget, push_files

    files = {"model.safetensors": b"\x08" + bytes(8000), "config.json": b"{}", "README.md": b"# card\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    url = push_files(HubTarget("alice/files"), tmp_path, iter(files), "three files", token=TOKEN)
    assert hub.files("alice/files") == {**files, **GITATTRIBUTES} and url.startswith(hub.url)
    assert len(hub.requests("PUT", "/lfs-upload/")) == 1  # the safetensors file went through LFS, the rest inline


def test_push_options_need_push_to_hub(models, tmp_path):
    base, adapter = models
    result = CliRunner().invoke(main, ["merge", "--base", str(base), "--out", str(tmp_path / "o"), "--private"])
    assert result.exit_code == 2 and "need --push-to-hub" in result.output and not (tmp_path / "o").exists()


def test_inspect_repo_ids_reads_headers_only(models, hub, tmp_path):
    """`convert inspect org/name` describes a model from its config and shard headers, no shard downloaded."""
    base, adapter = models
    local = CliRunner().invoke(main, ["inspect", "--json", str(base)])
    remote = CliRunner().invoke(main, ["inspect", "--json", "org/base"])
    assert remote.exit_code == 0, remote.output
    local_info, remote_info = json.loads(local.stdout), json.loads(remote.stdout)
    for key in ("parameters", "tensors", "dtypes", "quantization"):
        assert remote_info[key] == local_info[key], key
    assert [s["tensors"] for s in remote_info["shards"]] == [s["tensors"] for s in local_info["shards"]]
    assert not list((tmp_path / "hf-cache").rglob("model-*.safetensors"))
    info = json.loads(CliRunner().invoke(main, ["inspect", "--json", "org/adapter"]).stdout)
    assert info["kind"] == "adapter" and info == {
        **json.loads(CliRunner().invoke(main, ["inspect", "--json", str(adapter)]).stdout),
        "path": info["path"],
    }


def invoke_ok(*args: str) -> None:
    """Run a CLI command in-process (with the test token); it must succeed."""
    result = CliRunner().invoke(main, [*args, *(["--token", TOKEN] if "--push-to-hub" in args else [])])
    assert result.exit_code == 0, (result.output, result.exception)


def test_loftq_init_from_a_repo_id_pushes_base_and_adapter(models, hub, tmp_path):
    """loftq-init reads a Hub base shard by shard and pushes the 4-bit base with its adapter in one commit."""
    from tests.helpers import make_wide_base  # 64-wide rows: whole 4-bit blocks

    wide = make_wide_base(tmp_path / "wide", "llama", "bf16")
    hub.add_repo("org/wide", {p.name: p.read_bytes() for p in wide.iterdir() if p.is_file()})
    common = ["--rank", "2", "--iters", "1", "--device", "cpu", "--max-shard-size", SHARD, "-q"]
    invoke_ok("loftq-init", "--base", str(wide), "--out", str(tmp_path / "local"), *common)
    push = ("--push-to-hub", "alice/wide-loftq")
    invoke_ok("loftq-init", "--base", "org/wide", "--out", str(tmp_path / "remote"), *common, *push)
    named = {"README.md", "adapter/README.md", "adapter/adapter_config.json"}  # they name the base and its repo
    expected = {k: v for k, v in tree(tmp_path / "local").items() if k not in named}
    assert {k: v for k, v in tree(tmp_path / "remote").items() if k not in named} == expected
    config = json.loads((tmp_path / "remote" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "alice/wide-loftq"
    assert "adapter/adapter_model.safetensors" in expected and "model.safetensors.index.json" in expected
    on_hub = hub.files("alice/wide-loftq")
    assert {k: v for k, v in on_hub.items() if k in expected} == expected
    assert set(on_hub) - set(expected) == named | {".gitattributes"}
    assert len(hub.requests("POST", "/alice/wide-loftq/commit/")) == 1


def test_quantize_pushes_the_quantized_model(models, hub, tmp_path):
    """`convert quantize --push-to-hub`: the Hub gets the local output's bytes, with a card saying `quantized`."""
    common = ["quantize", "--base", "org/base", "--max-shard-size", SHARD, "--device", "cpu", "-q"]
    invoke_ok(*common, "--out", str(tmp_path / "q"))
    invoke_ok(*common, "--out", str(tmp_path / "q2"), "--push-to-hub", "alice/base-nf4")
    files = tree(tmp_path / "q2")
    assert files == tree(tmp_path / "q") and "config.json" in files
    assert json.loads(files["config.json"])["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    on_hub = hub.files("alice/base-nf4")
    assert {k: v for k, v in on_hub.items() if k != ".gitattributes"} == files
    assert b"base_model_relation: quantized" in files["README.md"] and b"base_model: org/base" in files["README.md"]


def cli_against(hub, tmp_path: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """`convert ARGS` in a subprocess (so that it can be killed) pointed at the look-alike by environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_XET": "1"}
    env |= {"HF_HOME": str(tmp_path / "hf-home")} | ({"CONVERT_FAULT": fault} if fault else {})
    command = [sys.executable, "-m", "convert.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("keep", [[], ["--no-keep-downloads"]], ids=["keep", "no-keep"])
def test_resume_a_hub_merge_after_a_kill(models, hub, tmp_path, keep):
    """A Hub base is fingerprinted by repo and commit, not by cache files that come and go: resume works."""
    base, adapter = models
    args = ["merge", *FROM_HUB, "--out", str(tmp_path / "out"), "--device", "cpu", "-q", *keep]
    killed = cli_against(hub, tmp_path, *args, fault="after-shard:2")
    assert killed.returncode == -9, killed.stderr
    resumed = cli_against(hub, tmp_path, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert without_card(tree(tmp_path / "out")) == without_card(merge_locally(base, adapter, tmp_path / "local"))


def test_network_failure_mid_merge_keeps_finished_shards(models, hub, tmp_path, monkeypatch):
    """The network going away is no bad input: finished shards stay for --resume, which then completes."""
    real, calls = formats.hub.hf_hub_download, []

    def flaky(repo, name, **kwargs):
        calls.append(name)
        if name.startswith("model-") and sum(c.startswith("model-") for c in calls) == 3:
            raise ConnectionResetError("connection reset by peer")
        return real(repo, name, **kwargs)

    monkeypatch.setattr(formats.hub, "hf_hub_download", flaky)
    out = tmp_path / "out"
    message = run(*FROM_HUB, "--out", str(out), "--device", "cpu", "-q", code=2)
    assert "cannot reach the Hub" in message and "rerun with --resume" in message
    assert len(journaled(out)) >= 1 and not out.exists()
    run(*FROM_HUB, "--out", str(out), "--device", "cpu", "-q", "--resume")
    base, adapter = models
    assert without_card(tree(out)) == without_card(merge_locally(base, adapter, tmp_path / "local"))


def test_repush_removes_weights_of_an_earlier_push(models, hub, tmp_path):
    """A sharded push over an earlier single-file one deletes `model.safetensors`, which transformers prefers."""
    base, adapter = models
    push = ("--push-to-hub", "alice/merged", "--token", TOKEN, "-q")
    run("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "a"), *push)
    run("--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "b"), "--max-shard-size", SHARD, *push)
    assert "model.safetensors" in tree(tmp_path / "a")
    assert set(hub.files("alice/merged")) - {".gitattributes"} == set(tree(tmp_path / "b"))


def test_no_keep_downloads_spares_blobs_other_snapshots_link(models, hub, tmp_path):
    """Deleting a consumed shard must not break an earlier revision's snapshot that shares its blob."""
    run(*FROM_HUB, "--out", str(tmp_path / "a"), "-q")
    (old,) = (tmp_path / "hf-cache" / "models--org--base" / "snapshots").iterdir()
    files = {**hub.files("org/base"), "generation_config.json": b'{"do_sample": false}'}
    commit = hub._commit("org/base", "v2", files, "v2")
    args = ["--base", f"org/base@{commit}", *FROM_HUB[2:]]
    run(*args, "--out", str(tmp_path / "b"), "-q", "--no-keep-downloads")
    shards = list(old.glob("model-*.safetensors"))
    assert shards and all(p.exists() for p in shards)


def test_token_with_a_line_ending_is_cleaned_and_never_shown(models, hub, tmp_path):
    base, adapter = models
    run(*FROM_HUB, "--out", str(tmp_path / "ok"), "--token", TOKEN + "\r\n", "-q")  # a token file saved with CRLF
    result = CliRunner().invoke(main, ["merge", *FROM_HUB, "--out", str(tmp_path / "o"), "--token", "hf_SECRET\x07x"])
    assert result.exit_code == 2 and "SECRET" not in result.output and "control characters" in result.output
