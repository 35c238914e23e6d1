"""The whole loop: re-embed the corpus, fine-tune on the current data, evaluate and promote."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tunedex.flows.finetune import finetune
from tunedex.flows.promote import evaluate_and_promote
from tunedex.flows.reembed import nightly_reembed


@flow(name="refresh", log_prints=True)
def refresh(config: str, overrides: list[str] | None = None, corpus: str | None = None) -> dict[str, Any]:
    """Each step is idempotent: unchanged documents embed nothing, an unchanged fine-tune (same config
    and data) returns its finished model, and a candidate that is already served is not re-promoted."""
    overrides = overrides or []
    index = nightly_reembed(config=config, corpus=corpus, overrides=overrides)
    trained = finetune(config=config, overrides=overrides)
    decision = evaluate_and_promote(config=config, overrides=overrides, model=trained["model_path"])
    return {"index": {k: v for k, v in index.items() if k != "skipped"}, "finetune": trained, "promotion": decision}
