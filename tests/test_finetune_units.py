"""Fine-tuning pieces on CPU without Ray: data checks, tokenizer, batches, model loading."""

import json
from pathlib import Path

import pytest
import torch

from tunedex.infra.config import FinetuneConfig
from tunedex.workers import finetune as ft

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
    with pytest.raises(ft.FinetuneError) as exc:
        ft.load_examples(path)
    msg = str(exc.value)
    assert "3 bad line(s)" in msg and "line 2:" in msg and "line 3:" in msg and "line 5:" in msg
    with pytest.raises(ft.FinetuneError, match="holds no examples"):
        ft.load_examples(_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ft.FinetuneError, match="does not exist"):
        ft.load_examples(tmp_path / "missing.jsonl")


def test_tiny_tokenizer_renders_every_format_and_round_trips(tmp_path):
    tok = ft.prepare_tokenizer(FinetuneConfig(tiny={"vocab_size": 400}), EXAMPLES * 5)
    rendered = [ft.render_example(ex, tok) for ex in EXAMPLES]
    assert rendered[0] == "<|user|>\nHi?<|end|>\n<|assistant|>\nHello there.<|end|>\n"
    assert rendered[1].endswith(" 4<|end|>") and rendered[2].endswith("example.<|end|>")
    ids, truncated = ft.tokenize(rendered, tok, max_length=8)
    assert truncated >= 1 and all(len(x) <= 8 for x in ids)
    full, _ = ft.tokenize(rendered[:1], tok, max_length=512)
    assert tok.decode(full[0]) == rendered[0]
    tok.save_pretrained(tmp_path / "tok")
    assert "chat_template" in (tmp_path / "tok" / "tokenizer_config.json").read_text() or (tmp_path / "tok" / "chat_template.jinja").is_file()


def test_collate_masks_padding_out_of_the_loss():
    batch = ft.collate([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_deepspeed_config_follows_ours():
    cfg = FinetuneConfig(deepspeed="zero3", gradient_accumulation_steps=4, per_device_train_batch_size=2)
    ds = ft.deepspeed_config(cfg, bf16=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["bf16"]["enabled"] is False


def test_local_base_model_loads_and_unsafe_ones_are_refused(tmp_path):
    tok = ft.prepare_tokenizer(FinetuneConfig(tiny={"vocab_size": 400}), EXAMPLES * 5)
    spec = ft.model_spec(FinetuneConfig(tiny={"n_embd": 32, "n_head": 2}, max_length=64), tok)
    model = ft.build_model(spec)
    local = tmp_path / "base"
    model.save_pretrained(local, safe_serialization=True)
    tok.save_pretrained(local)
    cfg = FinetuneConfig(base_model=str(local))
    loaded_tok = ft.prepare_tokenizer(cfg, EXAMPLES)
    loaded = ft.build_model(ft.model_spec(cfg, loaded_tok))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ft.FinetuneError, match="does not exist"):
        ft.check_base_model(FinetuneConfig(base_model=str(tmp_path / "missing")))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "model.safetensors").write_bytes((local / "model.safetensors").read_bytes())
    (remote / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(ft.FinetuneError, match="trust_remote_code"):
        ft.check_base_model(FinetuneConfig(base_model=str(remote)))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ft.FinetuneError, match="pickled .bin weights are refused"):
        ft.check_base_model(FinetuneConfig(base_model=str(pickled)))
