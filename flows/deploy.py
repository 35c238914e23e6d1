"""Prefect deployments of the tunedex flows: schedules from the config, one run at a time per flow."""

from __future__ import annotations

from typing import Any, Callable

from tunedex.infra.config import TunedexConfig


def flows() -> dict[str, Callable[..., Any]]:
    from tunedex.flows.finetune import finetune
    from tunedex.flows.promote import evaluate_and_promote
    from tunedex.flows.refresh import refresh
    from tunedex.flows.reembed import nightly_reembed

    return {"nightly-reembed": nightly_reembed, "finetune": finetune, "evaluate-and-promote": evaluate_and_promote,
            "refresh": refresh}


def deployments(cfg: TunedexConfig, config: str, overrides: list[str]) -> list[Any]:
    """One deployment per flow, named like the flow; overlapping runs of one deployment are cancelled
    (`CANCEL_NEW`): the run already going does the work."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    limit = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    crons = {"nightly-reembed": cfg.prefect.reembed_cron, "refresh": cfg.prefect.refresh_cron}
    out = []
    for name, fn in flows().items():
        cron = crons.get(name)
        out.append(fn.to_deployment(
            name=name, parameters={"config": config, "overrides": overrides}, concurrency_limit=limit,
            schedules=[Cron(cron, timezone=cfg.prefect.timezone)] if cron else None, tags=["tunedex"],
            work_pool_name=cfg.prefect.work_pool,
        ))
    return out
