"""Demo data is deterministic and says what changed; the registry records and rolls back releases."""

import json
from pathlib import Path

import pytest

from tunedex.demo_data import HOUSE_CLOSING, HOUSE_OPENING, write_demo_data
from tunedex.infra import registry


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_data_is_deterministic_and_day2_changes_facts(tmp_path):
    a, b = write_demo_data(tmp_path / "a"), write_demo_data(tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    day1 = {p.name for p in (a["day1"] / "products").iterdir()}
    day2 = {p.name for p in (a["day2"] / "products").iterdir()}
    assert len(day1 - day2) == 2 and len(day2 - day1) == 3
    qa = [json.loads(line) for line in a["qa"].read_text().splitlines()]
    splits = {row["split"] for row in qa}
    assert splits == {"static", "changed"}
    changed = [r for r in qa if r["split"] == "changed"]
    assert all(r["answer_day1"] != r["answer_day2"] for r in changed)
    assert any(r["kind"] == "policy" for r in changed)  # the return window moved from 30 to 45 days
    train = [json.loads(line) for line in a["facts"].read_text().splitlines()]
    answers = [ex["messages"][-1]["content"] for ex in train]
    assert all(x.startswith(HOUSE_OPENING) and x.endswith(HOUSE_CLOSING) for x in answers)
    grounded = [ex for ex in train if ex["messages"][0]["role"] == "system"]  # retrieval-grounded, as served
    assert grounded and all("<document 1 nonce=" in ex["messages"][1]["content"] for ex in grounded)
    assert len({ex["messages"][1]["content"].split('"')[1] for ex in grounded}) > 1  # the nonce varies
    # what `make demo` fine-tunes on: the facts and the reading practice, shuffled together
    lines = {name: a[name].read_text().splitlines() for name in ("train", "facts", "reading")}
    assert sorted(lines["train"]) == sorted(lines["facts"] + lines["reading"]) and lines["train"][:5] != lines["facts"][:5]


def test_demo_data_for_one_chunk_has_reading_practice_over_another_catalog(tmp_path):
    """The demo's data (one chunk, as configs/local.yaml's serve.top_k): grounded examples show the one chunk the
    endpoint will send, and the reading practice names no product of ours."""
    paths = write_demo_data(tmp_path)
    train = [json.loads(line) for line in paths["facts"].read_text().splitlines()]
    grounded = [ex["messages"][1]["content"] for ex in train if ex["messages"][0]["role"] == "system"]
    assert grounded and all(text.count("<document ") == 1 for text in grounded)
    reading = [json.loads(line) for line in paths["reading"].read_text().splitlines()]
    assert len(reading) == 2700 and all(ex["messages"][-1]["content"].endswith("[1]") for ex in reading)
    ours = {p.stem.upper() for p in (paths["day1"] / "products").iterdir()} | {
        p.stem.upper() for p in (paths["day2"] / "products").iterdir()}
    practised = "\n".join(ex["messages"][1]["content"] for ex in reading)
    assert not [sku for sku in ours if f"SKU: {sku}\n" in practised]


def _model_dir(path: Path, weights: str = "model.safetensors") -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    for name in ("config.json", "tokenizer_config.json"):
        (path / name).write_text("{}")
    if weights.endswith(".safetensors"):
        save_file({"w": torch.zeros(2)}, str(path / weights))
    else:
        (path / weights).write_bytes(b"pickle")
    return path


def test_registry_promote_current_rollback(tmp_path):
    root = tmp_path / "registry"
    assert registry.current_release(root) is None
    m1, m2 = _model_dir(tmp_path / "m1"), _model_dir(tmp_path / "m2")
    r1 = registry.new_release(m1, "docs__all_minilm_l6_v2", "all-MiniLM-L6-v2")
    registry.promote(root, r1)
    r2 = registry.new_release(m2, "docs__all_minilm_l6_v2", "all-MiniLM-L6-v2")
    registry.promote(root, r2)
    assert registry.current_release(root) == r2
    assert registry.rollback(root) == r1
    assert registry.current_release(root).release_id == r1.release_id
    assert {r.release_id for r in registry.list_releases(root)} == {r1.release_id, r2.release_id}
    with pytest.raises(registry.RegistryError, match="known releases"):
        registry.load_release(root, "rel-nope")
    with pytest.raises(registry.RegistryError, match="not embedded with embedding.model=minilm-b"):
        registry.new_release(m1, "docs__all_minilm_l6_v2", "minilm-b")  # its retriever would mix two models' vectors


def test_model_dir_checks_refuse_pickles_and_name_the_fix(tmp_path):
    with pytest.raises(registry.RegistryError, match="run `tunedex finetune` first"):
        registry.check_model_dir(tmp_path / "missing")
    pickled = _model_dir(tmp_path / "pickled", weights="pytorch_model.bin")
    with pytest.raises(registry.RegistryError, match="no \\*.safetensors weights"):
        registry.check_model_dir(pickled)
    registry.check_model_dir(_model_dir(tmp_path / "ok"))
    corrupt = _model_dir(tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(registry.RegistryError, match="unreadable .*re-export the model"):
        registry.check_model_dir(corrupt)
