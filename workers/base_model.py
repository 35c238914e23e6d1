"""The model a fine-tune starts from: a tiny model built from a config (with a byte-level BPE tokenizer trained
here, as no hub is needed), or a local dir / hub id checked before anything is read; LoRA wrapping; and the
base model saved beside the fine-tune so retrieval-only serving and evaluation can load it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tunedex.infra.config import FinetuneConfig
from tunedex.infra.errors import TunedexError

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Saved with the tokenizer so serving renders exactly the prompt format training used.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class BaseModelError(TunedexError, ValueError):
    """finetune.base_model cannot be used; the message names the path and the fix."""


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained here, for tiny models (no hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", bos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def prepare_tokenizer(ft: FinetuneConfig, examples: list[dict[str, Any]]) -> Any:
    if ft.base_model == "tiny":
        return train_tokenizer([json.dumps(ex, ensure_ascii=False) for ex in examples], ft.tiny.vocab_size)
    from transformers import AutoTokenizer

    check_base_model(ft)
    tokenizer = AutoTokenizer.from_pretrained(ft.base_model, trust_remote_code=ft.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_base_model(ft: FinetuneConfig) -> None:
    """Refuse pickle-only weights, remote code and paths that are not model dirs before anything is read."""
    path = Path(ft.base_model).expanduser()
    if not path.exists():
        if ft.base_model.startswith((".", "/", "~")) or not HUB_ID.fullmatch(ft.base_model) or ".." in ft.base_model:
            raise BaseModelError(
                f"finetune.base_model {ft.base_model!r} is neither an existing model dir nor a hub id (org/name); "
                "set it to a local Hugging Face model dir or a hub id"
            )
        if ft.adapter == "lora" and not ft.lora.merge:
            raise BaseModelError(
                f"finetune.lora.merge: false serves the adapter on its base, which must be a local model dir, not the "
                f"hub id {ft.base_model!r}: download it (`hf download {ft.base_model} --local-dir DIR`) and set "
                "finetune.base_model: DIR, or set finetune.lora.merge: true"
            )
        return  # a hub id: from_pretrained resolves it (and fails clearly when offline)
    if not path.is_dir():
        raise BaseModelError(f"finetune.base_model {path} is not a directory; point it at a Hugging Face model dir")
    if not (path / "config.json").is_file():
        raise BaseModelError(f"finetune.base_model {path} has no config.json; point it at a Hugging Face model dir")
    if not any(path.glob("*.safetensors")):
        raise BaseModelError(
            f"finetune.base_model {path} has no *.safetensors weights; pickled .bin weights are refused "
            "(they can run code when loaded): convert the model to safetensors first"
        )
    for name in ("config.json", "tokenizer_config.json"):
        meta = path / name
        try:
            remote = meta.is_file() and bool(json.loads(meta.read_text(encoding="utf-8")).get("auto_map"))
        except (UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise BaseModelError(f"finetune.base_model {path}: {name} is not a JSON object ({exc}); fix or re-download it") from None
        if remote and not ft.trust_remote_code:
            raise BaseModelError(
                f"finetune.base_model {path} needs custom code ({name} has auto_map); review that code and set "
                "finetune.trust_remote_code: true, or use a model transformers supports natively"
            )


def model_spec(ft: FinetuneConfig, tokenizer: Any) -> dict[str, Any]:
    lora = ft.lora.model_dump() if ft.adapter == "lora" else None
    if ft.base_model != "tiny":
        return {"path": ft.base_model, "trust_remote_code": ft.trust_remote_code, "lora": lora}
    t = ft.tiny
    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    if t.architecture == "gpt2":
        arch = {"gpt2": {**common, "n_layer": t.n_layer, "n_embd": t.n_embd, "n_head": t.n_head,
                         "n_positions": ft.max_length}}
        if t.dropout is not None:
            arch["gpt2"].update(embd_pdrop=t.dropout, attn_pdrop=t.dropout, resid_pdrop=t.dropout)
    else:
        arch = {"llama": {**common, "num_hidden_layers": t.n_layer, "hidden_size": t.n_embd,
                          "num_attention_heads": t.n_head, "intermediate_size": 4 * t.n_embd,
                          "max_position_embeddings": ft.max_length}}
        if t.dropout is not None:
            arch["llama"]["attention_dropout"] = t.dropout
    return {**arch, "lora": lora, "seed": ft.seed}


def build_model(spec: dict[str, Any]) -> Any:
    """The base model (built from a config, or loaded from safetensors), wrapped in LoRA when asked."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.get("seed", 0))  # a tiny model starts from the same weights on every rank and run
    if "gpt2" in spec:
        model = GPT2LMHeadModel(GPT2Config(**spec["gpt2"]))
    elif "llama" in spec:
        model = LlamaForCausalLM(LlamaConfig(**spec["llama"]))
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec["path"], use_safetensors=True, trust_remote_code=spec["trust_remote_code"]
        )
    if spec.get("lora"):
        from peft import LoraConfig, get_peft_model

        lora = spec["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
            target_modules=lora["target_modules"], task_type="CAUSAL_LM",
        ))
    return model


def save_model(model: Any, spec: dict[str, Any], out: Path) -> None:
    """The trained model as safetensors: the whole model (LoRA merged into it), or with finetune.lora.merge: false
    the adapter alone (adapter_config.json + adapter_model.safetensors), which vLLM serves on its base."""
    if spec.get("lora") and spec["lora"]["merge"]:
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)


def export_base(ft: FinetuneConfig, tokenizer: Any, out: Path) -> str:
    """Where the base model can be loaded from: a tiny base is rebuilt from its seed and saved beside the
    fine-tune (so `mode: rag` and evaluation can serve it); any other base is its own path or hub id."""
    if ft.base_model != "tiny":
        return ft.base_model
    model = build_model({**model_spec(ft, tokenizer), "lora": None})
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)
