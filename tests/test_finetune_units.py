"""Fine-tuning pieces on CPU without Ray: data checks, tokenizer, batches, model loading."""

import json
from pathlib import Path

import pytest
import torch

from tunedex.infra.config import FinetuneConfig
from tunedex.workers import base_model as bm, checkpoints as ck, training
from tunedex.workers import sft_data

EXAMPLES = [
    {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]},
    {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
    {"text": "Plain text example."},
]


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_training_lines_are_reported_with_numbers(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [json.dumps(EXAMPLES[0]), "{oops", json.dumps({"foo": 1}), "", "[1]"])
    with pytest.raises(sft_data.DataError) as exc:
        sft_data.load_examples(path)
    msg = str(exc.value)
    assert "3 bad line(s)" in msg and "line 2:" in msg and "line 3:" in msg and "line 5:" in msg
    with pytest.raises(sft_data.DataError, match="holds no examples"):
        sft_data.load_examples(_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(sft_data.DataError, match="does not exist"):
        sft_data.load_examples(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def tok():
    return bm.prepare_tokenizer(FinetuneConfig(tiny={"vocab_size": 400}), EXAMPLES * 5)


def test_tiny_tokenizer_renders_every_format_and_round_trips(tok, tmp_path):
    rendered = [sft_data.render(ex, tok, completion_only=True)[0] for ex in EXAMPLES]
    assert rendered[0] == "<|user|>\nHi?<|end|>\n<|assistant|>\nHello there.<|end|>\n"
    assert rendered[1].endswith(" 4<|end|>") and rendered[2].endswith("example.<|end|>")
    full = sft_data.tokenize(rendered[0], [(0, len(rendered[0]))], tok)
    assert tok.decode(full.input_ids) == rendered[0]
    tok.save_pretrained(tmp_path / "tok")
    saved = (tmp_path / "tok" / "tokenizer_config.json").read_text()
    assert "chat_template" in saved or (tmp_path / "tok" / "chat_template.jinja").is_file()


def _loss_text(ex, tok):
    return tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != sft_data.IGNORE])


def test_loss_only_on_assistant_turns_and_completions(tok):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                         {"role": "assistant", "content": "Goodbye."}]}
    ex = sft_data.tokenize(*sft_data.render(chat, tok, completion_only=True), tok)
    assert _loss_text(ex, tok) == "Hello.<|end|>\nGoodbye.<|end|>\n"
    pc = sft_data.tokenize(*sft_data.render(EXAMPLES[1], tok, completion_only=True), tok)
    assert _loss_text(pc, tok).strip() == "4<|end|>"
    everything = sft_data.tokenize(*sft_data.render(chat, tok, completion_only=False), tok)
    assert all(label != sft_data.IGNORE for label in everything.labels)


def test_overlong_examples_are_truncated_or_dropped_and_counted(tok):
    rows = [{"prompt": "word " * 50, "completion": " done"}, EXAMPLES[2]]
    kept, stats = sft_data.prepare(rows, tok, max_length=12, completion_only=True, overflow="truncate")
    assert stats.truncated == 1 and stats.dropped == 1 and len(kept) == 1  # the truncated one lost its completion
    kept, stats = sft_data.prepare(rows, tok, max_length=12, completion_only=False, overflow="truncate")
    assert stats.truncated == 1 and len(kept) == 2 and all(len(k.input_ids) <= 12 for k in kept)
    kept, stats = sft_data.prepare(rows, tok, max_length=12, completion_only=False, overflow="drop")
    assert stats.dropped == 1 and len(kept) == 1
    warning = stats.overflow_warning(12, len(rows))  # the run's log and summary say what it cost and the fix
    assert warning.startswith("1 of 2 examples are longer than finetune.max_length=12")
    assert f"set finetune.max_length: {stats.longest} or more" in warning and stats.longest > 50
    assert sft_data.prepare(rows, tok, max_length=stats.longest, completion_only=True,
                            overflow="truncate")[1].overflow_warning(stats.longest, 2) == ""


def test_packed_and_unpacked_batches_give_the_same_per_token_loss(tok):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": "Answer " * (i % 4 + 1)}]} for i in range(8)]
    examples, _ = sft_data.prepare(rows, tok, max_length=64, completion_only=True, overflow="truncate")
    model = bm.build_model(bm.model_spec(FinetuneConfig(tiny={"n_embd": 32, "n_head": 2}, max_length=128), tok)).eval()
    unpacked = sft_data.collate([sft_data.as_packed(x) for x in examples], tok.pad_token_id)
    packed_seqs = sft_data.pack(examples, max_length=64)
    assert len(packed_seqs) < len(examples)
    packed = sft_data.collate(packed_seqs, tok.pad_token_id)
    with torch.no_grad():
        a, b = model(**unpacked).loss, model(**packed).loss
    n_a = int((unpacked["labels"][:, 1:] != sft_data.IGNORE).sum())
    n_b = int((packed["labels"][:, 1:] != sft_data.IGNORE).sum())
    assert n_a == n_b > 0
    assert torch.allclose(a, b, atol=1e-5), (a.item(), b.item())


def test_tiny_dropout_is_the_architectures_default_unless_set(tok):
    def config(**tiny):
        return bm.build_model(bm.model_spec(FinetuneConfig(tiny={"n_embd": 32, "n_head": 2, **tiny}), tok)).config

    def gpt2_dropouts(**tiny):
        c = config(**tiny)
        return c.resid_pdrop, c.attn_pdrop, c.embd_pdrop

    assert gpt2_dropouts() == (0.1, 0.1, 0.1)  # GPT-2's
    assert gpt2_dropouts(dropout=0) == (0, 0, 0)
    assert config(architecture="llama").attention_dropout == 0.0  # Llama's
    assert config(architecture="llama", dropout=0.2).attention_dropout == 0.2


def test_collate_masks_padding_out_of_the_loss_and_attention():
    seqs = [sft_data.PackedSequence([5, 6, 7], [-100, 6, 7], [0, 0, 1], [0, 1, 0]),
            sft_data.PackedSequence([8], [-100], [0], [0])]
    batch = sft_data.collate(seqs, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    mask = batch["attention_mask"][:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]  # the second example does not see the first
    assert mask[1] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_deepspeed_config_follows_ours():
    cfg = FinetuneConfig(deepspeed="zero3", gradient_accumulation_steps=4, per_device_train_batch_size=2,
                         offload_optimizer=True)
    ds = training.deepspeed_config(cfg, bf16=True)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["bf16"]["enabled"] is True
    f = training.lr_lambda(2, 10, "linear")
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_checkpoint_markers_refuse_partial_and_altered_checkpoints(tmp_path):
    for rank in (0, 1):
        (tmp_path / f"zero_rank{rank}.pt").write_bytes(b"shard %d" % rank)
        files = {f"zero_rank{rank}.pt": ck.file_hashes(tmp_path)[f"zero_rank{rank}.pt"]}
        (tmp_path / ck.MARKER.format(rank=rank)).write_text(json.dumps({"rank": rank, "world": 2, "step": 5, "files": files}))
    assert ck.verify_checkpoint(tmp_path, world=2)["step"] == 5
    with pytest.raises(ck.CheckpointError, match="resume with num_workers=2"):
        ck.verify_checkpoint(tmp_path, world=1)
    (tmp_path / "zero_rank1.pt").write_bytes(b"tampered")
    with pytest.raises(ck.CheckpointError, match="altered"):
        ck.verify_checkpoint(tmp_path, world=2)
    (tmp_path / ck.MARKER.format(rank=1)).unlink()
    with pytest.raises(ck.CheckpointError, match="partial"):
        ck.verify_checkpoint(tmp_path, world=2)


def test_local_base_model_loads_and_unsafe_ones_are_refused(tmp_path):
    tok = bm.prepare_tokenizer(FinetuneConfig(tiny={"vocab_size": 400}), EXAMPLES * 5)
    spec = bm.model_spec(FinetuneConfig(tiny={"n_embd": 32, "n_head": 2}, max_length=64), tok)
    model = bm.build_model(spec)
    local = tmp_path / "base"
    model.save_pretrained(local, safe_serialization=True)
    tok.save_pretrained(local)
    cfg = FinetuneConfig(base_model=str(local))
    loaded_tok = bm.prepare_tokenizer(cfg, EXAMPLES)
    loaded = bm.build_model(bm.model_spec(cfg, loaded_tok))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(bm.BaseModelError, match="neither an existing model dir nor a hub id"):
        bm.check_base_model(FinetuneConfig(base_model=str(tmp_path / "missing")))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "model.safetensors").write_bytes((local / "model.safetensors").read_bytes())
    (remote / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(bm.BaseModelError, match="trust_remote_code"):
        bm.check_base_model(FinetuneConfig(base_model=str(remote)))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(bm.BaseModelError, match="pickled .bin weights are refused"):
        bm.check_base_model(FinetuneConfig(base_model=str(pickled)))


def test_stale_extension_build_locks_are_cleared_and_fresh_ones_kept(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert training.clear_stale_build_locks(max_age_s=300) == [stale]
    assert not stale.exists() and fresh.exists()


def test_an_unmerged_adapter_exports_alone_loads_on_its_base_and_bad_ones_are_refused(tmp_path):
    import shutil

    from pydantic import ValidationError
    from safetensors import safe_open

    from conftest import lora_models
    from tunedex.infra import registry
    from tunedex.infra.generation import load_generator

    base, [adapter] = lora_models(tmp_path, (1,))
    assert sorted(p.name for p in adapter.glob("*.safetensors")) == ["adapter_model.safetensors"]
    registry.check_model_dir(adapter)
    assert registry.is_adapter(adapter) and not registry.is_adapter(base)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())  # the adapter alone, not the base's weights

    merged, tok = load_generator(str(adapter))  # evaluation's loader: the base with the adapter merged in
    plain, _ = load_generator(str(base))
    ids = tok("Product 7 costs", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, plain(ids).logits)  # the adapter changes the model

    spec = bm.model_spec(FinetuneConfig(tiny={"architecture": "llama", "n_embd": 128, "n_head": 4},
                                        adapter="lora", lora={"merge": True}), tok)
    bm.save_model(bm.build_model(spec), spec, tmp_path / "merged")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert f.keys() and not any("lora" in k for k in f.keys())  # merge: true exports a plain model

    orphan = tmp_path / "orphan"
    shutil.copytree(adapter, orphan)
    (orphan / "model_card.json").unlink()
    with pytest.raises(registry.RegistryError, match="names no base model dir"):
        registry.check_model_dir(orphan)
    (orphan / "adapter_model.safetensors").rename(orphan / "adapter_model.bin")
    with pytest.raises(registry.RegistryError, match="pickled .bin weights are refused"):
        registry.check_model_dir(orphan)
    with pytest.raises(ValidationError, match="no LoRA for GPT-2"):
        FinetuneConfig(adapter="lora", lora={"merge": False})
    with pytest.raises(bm.BaseModelError, match="must be a local model dir"):
        bm.check_base_model(FinetuneConfig(base_model="org/model", adapter="lora", lora={"merge": False}))
