"""The activation cache: what it stores, training from it equals streaming, resume, corruption, the CLI."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import activations.cache as cache_module
from activations.cache import CacheConfig, CachedActivationSource, read_manifest, write_cache
from activations.errors import UserError
from activations.sources import open_text_source
from activations.store import ActivationStore, StoreConfig
from activations.tokens import batch_contexts, pack_contexts
from sae.cli import main
from sae.config import SAEConfig
from sae.registry import make_sae
from training.config import TrainConfig
from training.trainer import Trainer

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
STORE = dict(context_size=64, model_batch_size=8, batch_size=256, buffer_tokens=2048, seed=3)


def _docs(n=250):
    return [d for _, d in zip(range(n), open_text_source("tinyshakespeare", split="train"))]


@pytest.fixture(scope="module")
def docs():
    return _docs()


@pytest.fixture(scope="module")
def cache(tiny_llama, docs, tmp_path_factory):
    """A 3-shard cache of two hooks, float32."""
    folder = tmp_path_factory.mktemp("cache")
    write_cache(
        tiny_llama, docs, StoreConfig(hooks=HOOKS, **STORE), folder, CacheConfig(tokens=6000, shard_tokens=2200)
    )
    return folder


def test_shards_hold_the_stream_with_provenance(tiny_llama, docs, cache):
    m = read_manifest(cache)
    assert m["complete"] and m["hooks"] == HOOKS and m["d_model"] == 64 and m["dtype"] == "float32"
    assert len(m["shards"]) >= 3 and m["tokens"] >= 6000 and sum(s["tokens"] for s in m["shards"]) == m["tokens"]
    assert m["context_size"] == 64 and m["skip_first"] and m["skip_special"]
    store = ActivationStore(tiny_llama, docs, StoreConfig(hooks=HOOKS, **STORE, normalise=False, epochs=1))
    chunks = []
    for chunk in store.raw_activations():  # the stream's first m["tokens"] rows
        chunks.append(chunk)
        if sum(len(c) for c in chunks) >= m["tokens"]:
            break
    raw = torch.cat(chunks)[: m["tokens"]]
    shards = [load_file(cache / s["file"]) for s in m["shards"]]
    acts = torch.cat([s["activations"] for s in shards])
    torch.testing.assert_close(acts, raw, rtol=0, atol=0)  # unshuffled, unnormalised, in stream order
    # Provenance: every row points at its context and position, and the token there is the row's token.
    contexts = list(batch_contexts(pack_contexts(docs, tiny_llama.tokenizer, 64), 8))
    tokens = torch.cat([c.tokens for c in contexts])
    doc_ids = torch.cat([c.doc_ids for c in contexts])
    ctx, pos = (torch.cat([s[k] for s in shards]).long() for k in ("context_ids", "context_positions"))
    assert torch.equal(torch.cat([s["token_ids"] for s in shards]), tokens[ctx, pos])
    assert torch.equal(torch.cat([s["doc_ids"] for s in shards]), doc_ids[ctx, pos])
    assert torch.equal(torch.cat([s["context_tokens"] for s in shards]), tokens[: m["contexts"]])
    assert (pos > 0).all()  # the first position of each context is skipped, as the store does
    # Normalisation scales over the whole cache: sqrt(d) / mean norm.
    for i, hook in enumerate(HOOKS):
        assert m["scales"][hook] == pytest.approx(8.0 / raw[:, i].norm(dim=-1).mean().item(), rel=1e-5)


def _train(lm, store, hook_index, tmp_path, name):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=64, d_sae=128, k=8))
    cfg = TrainConfig(tokens=4096, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=100)
    return Trainer(sae, store, cfg, tmp_path / name, hook_index=hook_index).train()


def test_training_from_the_cache_equals_streaming(tiny_llama, docs, cache, tmp_path):
    hook = HOOKS[1]
    streamed = ActivationStore(tiny_llama, docs, StoreConfig(hooks=[hook], **STORE))
    from_cache = CachedActivationSource(cache, StoreConfig(hooks=[hook], **STORE))
    a = _train(tiny_llama, streamed, 0, tmp_path, "stream")
    b = _train(tiny_llama, from_cache, 0, tmp_path, "cache")
    assert from_cache.scales == streamed.scales
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    # and the run was real: the SAE learned
    lines = [json.loads(line) for line in (tmp_path / "cache" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["fvu"] < 0.85 * lines[0]["fvu"]


def test_the_cache_replays_the_same_batches_as_the_store(tiny_llama, docs, cache):
    cfg = StoreConfig(hooks=HOOKS, **STORE, epochs=1)
    streamed = torch.cat(list(ActivationStore(tiny_llama, docs, cfg)))
    replayed = torch.cat(list(CachedActivationSource(cache, cfg)))
    n = min(len(streamed), len(replayed))
    # The cache holds a prefix of the stream, so the buffer differs only once the cache runs out.
    torch.testing.assert_close(replayed[: n // 2], streamed[: n // 2], rtol=0, atol=0)
    assert len(replayed) == read_manifest(cache)["tokens"]  # one pass, every cached token once


def test_a_source_restarted_from_its_state_continues_exactly(cache, tmp_path):
    """Stopped between any two batches (here also past the cache's end, where it starts over), a new source
    given the old one's state_dict (saved and loaded as a checkpoint does) hands out exactly the rest."""
    cfg = StoreConfig(hooks=HOOKS, **STORE)
    it = iter(CachedActivationSource(cache, cfg))
    whole = [next(it) for _ in range(40)]  # 10240 rows: more than the cache's 6000
    for cut in (1, 17, 33):
        source = CachedActivationSource(cache, cfg)
        it = iter(source)
        for _ in range(cut):
            next(it)
        torch.save(source.state_dict(), tmp_path / "state.pt")
        resumed = CachedActivationSource(cache, cfg)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        it = iter(resumed)
        for i in range(cut, 40):
            assert torch.equal(next(it), whole[i]), (cut, i)


def test_resume_after_a_kill_keeps_finished_shards(tiny_llama, docs, cache, tmp_path, monkeypatch):

    folder = tmp_path / "c"
    real, calls = cache_module._save_shard, []

    def killed_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_save_shard", killed_after_two)
    cfg = StoreConfig(hooks=HOOKS, **STORE)
    with pytest.raises(KeyboardInterrupt):
        write_cache(tiny_llama, docs, cfg, folder, CacheConfig(tokens=6000, shard_tokens=2200))
    m = read_manifest(folder)
    assert len(m["shards"]) == 2 and not m["complete"]
    with pytest.raises(UserError, match=r"incomplete.*finish it with `sae cache --out"):
        CachedActivationSource(folder, StoreConfig(hooks=HOOKS))
    before = {s["file"]: (folder / s["file"]).stat().st_mtime_ns for s in m["shards"]}
    monkeypatch.setattr(cache_module, "_save_shard", real)
    resumed = write_cache(tiny_llama, docs, cfg, folder, CacheConfig(tokens=6000, shard_tokens=2200))
    assert {f: (folder / f).stat().st_mtime_ns for f in before} == before  # finished shards not redone
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in read_manifest(cache)["shards"]]
    assert not list(folder.glob(".shard-*"))


def test_a_damaged_shard_is_named_and_rebuilt(tiny_llama, docs, cache, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(cache, folder)
    shard = folder / "shard-00001.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(
        UserError,
        match=r"shard-00001.safetensors is truncated.*delete .*shard-00001.safetensors and re-run `sae cache --out",
    ):
        CachedActivationSource(folder, StoreConfig(hooks=HOOKS))
    corrupt = bytearray(original)
    corrupt[-100] ^= 0xFF  # same size, one flipped byte in the activations
    shard.write_bytes(bytes(corrupt))
    source = CachedActivationSource(folder, StoreConfig(hooks=HOOKS, **STORE))
    with pytest.raises(UserError, match=r"shard-00001.safetensors is corrupt \(its sha256.*delete .*and re-run"):
        list(source)
    shard.unlink()  # the fix the message gives
    write_cache(
        tiny_llama, docs, StoreConfig(hooks=HOOKS, **STORE), folder, CacheConfig(tokens=6000, shard_tokens=2200)
    )
    assert shard.read_bytes() == original


def test_bfloat16_cache_and_missing_hook(tiny_llama, docs, cache, tmp_path):
    folder = tmp_path / "bf16"
    write_cache(
        tiny_llama,
        docs[:20],
        StoreConfig(hooks=HOOKS, **STORE),
        folder,
        CacheConfig(tokens=1500, shard_tokens=1000, dtype="bfloat16"),
    )
    half = torch.cat(
        list(
            CachedActivationSource(
                folder, StoreConfig(hooks=HOOKS, **STORE, normalise=False, epochs=1)
            ).raw_activations()
        )
    )
    full = torch.cat(
        list(
            CachedActivationSource(
                cache, StoreConfig(hooks=HOOKS, **STORE, normalise=False, epochs=1)
            ).raw_activations()
        )
    )
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full[: len(half)], rtol=1e-2, atol=1e-2)
    assert (folder / "shard-00000.safetensors").stat().st_size < 0.6 * (
        cache / "shard-00000.safetensors"
    ).stat().st_size
    with pytest.raises(UserError, match=r"has no hook blocks.3.hook_resid_post; it holds blocks.1.hook_resid_post"):
        CachedActivationSource(cache, StoreConfig(hooks=["blocks.3.hook_resid_post"]))
    with pytest.raises(UserError, match=r"is not an activation cache \(manifest.json missing\)"):
        CachedActivationSource(tmp_path, StoreConfig(hooks=HOOKS))


def test_cache_and_train_from_it_on_the_command_line(tiny_llama_dir, tmp_path, capsys):
    folder, run = tmp_path / "cache", tmp_path / "run"
    base = [
        "cache",
        "--out",
        str(folder),
        "--model",
        tiny_llama_dir,
        "--dataset",
        "tinyshakespeare",
        "--tokens",
        "3000",
        "--shard-tokens",
        "1500",
        "--context-size",
        "64",
        "--device",
        "cpu",
    ]
    assert main([*base, "--hooks", ",".join(HOOKS)]) == 0
    assert main([*base, "--hooks", "blocks.0.hook_resid_post"]) == 2  # a different cache in the same folder
    err = capsys.readouterr().err
    assert "already caches hooks=" in err and "choose another --out" in err
    assert (
        main(
            [
                "train",
                "--activations",
                str(folder),
                "--hook",
                HOOKS[0],
                "--tokens",
                "2048",
                "--batch-size",
                "256",
                "--buffer-tokens",
                "1024",
                "--expansion",
                "2",
                "--k",
                "8",
                "--eval-tokens",
                "256",
                "--device",
                "cpu",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    cfg = json.loads((run / "cfg.json").read_text())["saelab"]
    assert cfg["hook_name"] == HOOKS[0] and cfg["model_name"] == tiny_llama_dir and cfg["dataset"] == "tinyshakespeare"
    assert json.loads((run / "eval.json").read_text())["tokens"] >= 256  # evaluated with the cache's model
    assert (
        main(
            [
                "train",
                "--activations",
                str(folder),
                "--hook",
                "blocks.3.hook_resid_post",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "r2"),
            ]
        )
        == 2
    )
    assert "has no hook blocks.3.hook_resid_post" in capsys.readouterr().err


# ---- a corrupt manifest is named, with the fix, and `sae cache` repairs it ----------------------------


def _edit_manifest(folder, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


BROKEN_ENTRIES = {
    "no bytes": (lambda e: e.pop("bytes"), r"shard entry 1 \(shard-00001.safetensors\) has no 'bytes'"),
    "no sha256": (lambda e: e.pop("sha256"), r"shard entry 1 \(shard-00001.safetensors\) has no 'sha256'"),
    "no tokens": (lambda e: e.pop("tokens"), r"shard entry 1 \(shard-00001.safetensors\) has no 'tokens'"),
    "bytes a string": (lambda e: e.update(bytes="12"), r"has bytes '12', not a non-negative integer"),
    "short sha256": (lambda e: e.update(sha256="abc"), r"has sha256 'abc', not a 64-digit hex digest"),
    "path outside": (lambda e: e.update(file="../x.safetensors"), r"names the file '../x.safetensors'"),
    "norm_sums": (lambda e: e.update(norm_sums=[1.0]), r"has norm_sums \[1.0\], not one number per hook"),
    "gap": (lambda e: e.update(first_context=e["first_context"] + 1), r"starts at context \d+, the shards before"),
}


@pytest.mark.parametrize("case", list(BROKEN_ENTRIES))
def test_a_broken_shard_entry_is_named_with_the_fix(cache, tmp_path, case):
    folder = tmp_path / "c"
    shutil.copytree(cache, folder)
    edit, message = BROKEN_ENTRIES[case]
    _edit_manifest(folder, lambda m: edit(m["shards"][1]))
    for read in (read_manifest, lambda f: CachedActivationSource(f, StoreConfig(hooks=HOOKS))):
        with pytest.raises(UserError, match=message) as err:
            read(folder)
        line = str(err.value)
        assert str(folder / "manifest.json") in line and "\n" not in line
        assert f"re-run `sae cache --out {folder}` to repair it" in line


def test_sae_cache_repairs_a_manifest_entry_without_bytes(tiny_llama, docs, cache, tmp_path, capsys):
    folder = tmp_path / "c"
    shutil.copytree(cache, folder)
    _edit_manifest(folder, lambda m: m["shards"][1].pop("bytes"))
    write_cache(  # the fix the message gives
        tiny_llama, docs, StoreConfig(hooks=HOOKS, **STORE), folder, CacheConfig(tokens=6000, shard_tokens=2200)
    )
    assert "shard entry 1 (shard-00001.safetensors) has no 'bytes'; writing it and the shards after" in (
        capsys.readouterr().out
    )
    assert read_manifest(folder) == read_manifest(cache)
    for entry in read_manifest(folder)["shards"]:
        assert (folder / entry["file"]).read_bytes() == (cache / entry["file"]).read_bytes()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("hooks"), r"manifest.json has no 'hooks'; delete .* and re-run `sae cache --out"),
        (lambda m: m.update(d_model="64"), r"'d_model' is '64', not of type int"),
        (lambda m: m.update(shards={}), r"'shards' is \{\}, not of type list"),
        (lambda m: m.update(dtype="int8"), r"dtype 'int8' or hooks .* are not valid"),
        (lambda m: m["shards"].__setitem__(0, "shard-00000.safetensors"), r"shard entry 0 is 'shard-00000"),
    ],
)
def test_a_broken_manifest_field_is_named(cache, tmp_path, edit, message):
    folder = tmp_path / "c"
    shutil.copytree(cache, folder)
    _edit_manifest(folder, edit)
    with pytest.raises(UserError, match=message):
        read_manifest(folder)
