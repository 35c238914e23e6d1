"""The release registry: which (model, collection) pair the endpoint serves.

A release is written once as `releases/<id>.json`; `current.json` names the promoted one and
`history.json` the order of promotions (rollback = promote the previous one). Each file is
written to a temp name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunedex.infra.errors import TunedexError
from tunedex.infra.ids import content_hash, slug


class RegistryError(TunedexError, ValueError):
    """A release that cannot be recorded or found; the message says what to do."""


@dataclass(frozen=True)
class Release:
    release_id: str
    model_path: str
    collection: str
    embedding_model: str
    created_at: str
    eval_report: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""  # what the model was fine-tuned from (a dir or hub id), for `mode: rag`
    adapter: bool = False  # model_path is a LoRA adapter, served on base_model
    consistency_level: str = ""  # what the release's retrieval reads at (milvus.consistency_level when promoted)


def check_model_dir(path: Path) -> None:
    """A servable model dir holds safetensors weights, a config and a tokenizer; a LoRA adapter dir holds
    adapter_model.safetensors, adapter_config.json and a tokenizer, and its model card names a servable base."""
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise RegistryError(f"model dir {path} {what}; run `tunedex finetune` first or pass an exported model dir")
    adapter = is_adapter(path)
    if not any(path.glob("*.safetensors")):
        raise RegistryError(
            f"model dir {path} has no *.safetensors weights; export with `tunedex finetune` (pickled .bin weights are refused)"
        )
    for name in ("adapter_config.json" if adapter else "config.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            raise RegistryError(f"model dir {path} has no {name}; it is not a complete exported model")
        try:
            meta = json.loads((path / name).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RegistryError(f"model dir {path}: {name} is not valid JSON ({exc}); re-export the model") from None
        if isinstance(meta, dict) and meta.get("auto_map"):  # custom code, run on load
            raise RegistryError(f"model dir {path}: {name} has auto_map (custom model code); tunedex serves with "
                                "trust_remote_code=false: export a model transformers supports natively")
    from safetensors import safe_open

    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as fh:  # reads the header only
                fh.keys()
        except Exception as exc:
            raise RegistryError(f"model weights {weights} are unreadable ({exc}); re-export the model") from None
    if adapter:
        base = base_model_of(path)
        if not base or is_adapter(Path(base)):
            raise RegistryError(f"adapter dir {path}: its model_card.json names no base model dir (base_model_path) "
                                "to serve it on; export it with `tunedex finetune` or set finetune.lora.merge: true")
        check_model_dir(Path(base))


def is_adapter(path: Path) -> bool:
    """A LoRA adapter exported unmerged (finetune.lora.merge: false), served on its base model."""
    return (path / "adapter_config.json").is_file()


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def base_model_of(model_path: Path) -> str:
    """What the model was fine-tuned from, as its model card records it ("" when it has no card)."""
    card = model_path / "model_card.json"
    return json.loads(card.read_text(encoding="utf-8")).get("base_model_path", "") if card.is_file() else ""


def new_release(model_path: Path, collection: str, embedding_model: str, eval_report: dict | None = None,
                consistency_level: str = "") -> Release:
    if not collection.endswith(f"__{slug(embedding_model)}"):
        # a collection is named after the model that embedded it (`<prefix>__<model slug>`)
        raise RegistryError(f"collection {collection} was not embedded with embedding.model={embedding_model}; "
                            "set embedding.model to the model that built it, or index the corpus with this model")
    now = datetime.now(timezone.utc)
    digest = content_hash(f"{model_path.resolve()}|{collection}|{now.isoformat()}")[:6]
    return Release(
        release_id=f"rel-{now:%Y%m%d-%H%M%S}-{digest}",
        model_path=str(model_path.resolve()),
        collection=collection,
        embedding_model=embedding_model,
        created_at=now.isoformat(timespec="seconds"),
        eval_report=eval_report or {},
        base_model=base_model_of(model_path),
        adapter=is_adapter(model_path),
        consistency_level=consistency_level,
    )


def candidate_release(cfg: Any, model_path: Path, collection: str | None = None,
                      eval_report: dict | None = None) -> Release:
    """A release of `model_path` and `collection` (default: the live collection), not yet recorded: what
    `tunedex promote` and the evaluate-and-promote flow record, and `tunedex report --model` / `demo-effect` evaluate."""
    check_model_dir(model_path)
    if collection is None:
        collection = live_collection(cfg)
        if collection is None:
            raise RegistryError("no indexed collection yet; run `tunedex index CORPUS` (or the nightly-reembed flow) "
                                "or pass --collection")
    return new_release(model_path, collection, cfg.embedding.model, eval_report=eval_report,
                       consistency_level=cfg.milvus.consistency_level)


def point_live(cfg: Any, client: Any, collection: str) -> None:
    """Make `collection` the live one under `milvus.collection`: recorded in `live.json` here, the source of truth
    on every engine, and the Milvus alias moved too where the engine has aliases (milvus-lite 2.5 has none)."""
    from tunedex.infra import store

    alias = store.live_alias(cfg.milvus)
    live = _live(cfg.registry_dir)
    if live.get(alias, {}).get("collection") != collection:
        live[alias] = {"collection": collection, "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json_atomic(cfg.registry_dir / "live.json", live)
    if store.has_aliases(client):
        store.point_alias(client, alias, collection)


def live_collection(cfg: Any, client: Any = None) -> str | None:
    """The live collection under `milvus.collection`: the registry's record; for an index built before the
    registry kept one, the Milvus alias's target where the engine has aliases; None when nothing is indexed."""
    from tunedex.infra import store

    alias = store.live_alias(cfg.milvus)
    if recorded := _live(cfg.registry_dir).get(alias):
        return recorded["collection"]
    if client is not None:
        return store.alias_target(client, alias)
    with closing(store.connect(cfg.milvus)) as own:
        return store.alias_target(own, alias)


def _live(root: Path) -> dict[str, dict[str, str]]:
    path = root / "live.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def save_release(root: Path, release: Release) -> None:
    write_json_atomic(root / "releases" / f"{release.release_id}.json", asdict(release))


def load_release(root: Path, release_id: str) -> Release:
    path = root / "releases" / f"{release_id}.json"
    if not path.is_file():
        known = ", ".join(r.release_id for r in list_releases(root)) or "none yet"
        raise RegistryError(f"no release {release_id!r} in {root}; known releases: {known}")
    return Release(**json.loads(path.read_text(encoding="utf-8")))


def list_releases(root: Path) -> list[Release]:
    files = sorted((root / "releases").glob("rel-*.json"))
    return [Release(**json.loads(p.read_text(encoding="utf-8"))) for p in files]


def register_model(root: Path, name: str, path: Path, card: dict[str, Any]) -> None:
    """Record a model version (an exported fine-tune) with its card."""
    write_json_atomic(root / "models" / f"{name}.json", {"name": name, "path": str(path), "card": card,
                                                         "registered_at": datetime.now(timezone.utc).isoformat()})


def load_model(root: Path, name: str) -> dict[str, Any] | None:
    path = root / "models" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def latest_model(root: Path) -> Path | None:
    """The most recently registered model version's dir."""
    records = [json.loads(p.read_text(encoding="utf-8")) for p in (root / "models").glob("*.json")]
    return Path(max(records, key=lambda r: r["registered_at"])["path"]) if records else None


def promote(root: Path, release: Release) -> None:
    """Make `release` the one the endpoint serves."""
    save_release(root, release)
    history = _history(root)
    history.append(release.release_id)
    write_json_atomic(root / "history.json", history)
    write_json_atomic(root / "current.json", {"release_id": release.release_id})


def current_release(root: Path) -> Release | None:
    path = root / "current.json"
    if not path.is_file():
        return None
    return load_release(root, json.loads(path.read_text(encoding="utf-8"))["release_id"])


def previous_release(root: Path) -> Release:
    """The release that was current before the current one (what `rollback` serves again)."""
    history = _history(root)
    if len(history) < 2:
        raise RegistryError("nothing to roll back to: fewer than two promotions are recorded")
    return load_release(root, history[-2])


def rollback(root: Path) -> Release:
    """Promote the release that was current before the current one."""
    previous = previous_release(root)
    promote(root, previous)
    return previous


def _history(root: Path) -> list[str]:
    path = root / "history.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
