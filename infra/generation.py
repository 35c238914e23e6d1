"""Prompts and sampling shared by both generation paths, and in-process Hugging Face generation.

The endpoint generates on vLLM (`serving/engine.py`); the evaluation worker (`workers/evaluate.py`) generates here,
in its own process with `transformers`, on a batch of prompts. A prompt is either chat messages (rendered
with the model's chat template, as training rendered them) or raw text (for `/v1/completions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

Prompt = Union[str, list[dict[str, str]]]


@dataclass(frozen=True)
class Sampling:
    """What a request may set; `temperature` 0 (or unset) is greedy."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def key(self) -> tuple:
        """Requests with the same key can share one `generate` call."""
        return (True,) if self.greedy else (False, self.temperature, self.top_p or 1.0)


@dataclass(frozen=True)
class Generated:
    """One request's generation: the text, its token counts (OpenAI's `usage`), and why it ended: "stop" (the
    model ended it) or "length" (it reached max_tokens, capped at serve.max_new_tokens)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"


def load_generator(model_path: str) -> tuple[Any, Any]:
    """An exported model dir (safetensors only, no remote code) as (model, tokenizer), ready for inference; a LoRA
    adapter dir is loaded on its base and merged in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunedex.infra.registry import base_model_of, check_model_dir, is_adapter

    check_model_dir(Path(model_path))  # before transformers reads anything: no pickles, no remote code
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    tokenizer.padding_side = "left"  # a batch's prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = is_adapter(Path(model_path))
    weights = base_model_of(Path(model_path)) if adapter else model_path
    model = AutoModelForCausalLM.from_pretrained(weights, use_safetensors=True, trust_remote_code=False)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
    model.eval()
    return model, tokenizer


def context_length(model: Any) -> int:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or cfg.max_position_embeddings


def render(tokenizer: Any, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, prompt: Prompt, limit: int, room: int) -> list[int]:
    """Token ids of the rendered prompt, keeping the end (the question, the assistant turn) when too long."""
    ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return ids[-(limit - room):]


def room_for(context: int, sampling: Sampling, default_max: int) -> int:
    """New tokens a request gets: what it asked for, capped by the server's limit and a quarter of the context."""
    return max(1, min(sampling.max_new_tokens or default_max, default_max, context // 4))


def sampling_kwargs(sampling: Sampling) -> dict[str, Any]:
    if sampling.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p or 1.0}


def generate_batch(model: Any, tokenizer: Any, prompts: list[Prompt], samplings: list[Sampling],
                   default_max: int) -> list[str]:
    """Answers in input order; prompts with the same sampling share one left-padded `generate` call."""
    groups: dict[tuple, list[int]] = {}
    for i, sampling in enumerate(samplings):
        groups.setdefault(sampling.key(), []).append(i)
    out: list[str] = [""] * len(prompts)
    for members in groups.values():
        for i, text in zip(members, _generate_group(model, tokenizer, [prompts[i] for i in members],
                                                      [samplings[i] for i in members], default_max)):
            out[i] = text
    return out


def _generate_group(model: Any, tokenizer: Any, prompts: list[Prompt], samplings: list[Sampling],
                    default_max: int) -> list[str]:
    import torch

    rooms = [room_for(context_length(model), s, default_max) for s in samplings]
    limit = context_length(model)
    encoded = [prompt_ids(tokenizer, p, limit, max(rooms)) for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max(rooms),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             **sampling_kwargs(samplings[0]))
    return [tokenizer.decode(out[row, width:width + room], skip_special_tokens=True).strip()
            for row, room in enumerate(rooms)]
