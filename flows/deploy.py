"""Prefect deployments of the tunedex flows: schedules from the config, one run at a time per flow, and
crash detection for runs whose process died with nobody left to report it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

from tunedex.infra.config import TunedexConfig

# Prefect's floor is 30 s and its docs ask for "an integer greater than 30".
HEARTBEAT_SECONDS = 31
# A run whose worker died before its process started (stuck in PENDING) holds the one slot until its lease
# expires: Prefect's default is 300 s; 60 s is its minimum and ample for `tunedex worker` to start a process.
SLOT_GRACE_SECONDS = 60
CRASH_DETECTION = "tunedex: crash runs that stopped heartbeating"
CORPUS_CHANGED = "tunedex.corpus.changed"  # the event that starts a nightly-reembed run now


def flows() -> dict[str, Callable[..., Any]]:
    from tunedex.flows.finetune import finetune
    from tunedex.flows.promote import evaluate_and_promote
    from tunedex.flows.refresh import refresh
    from tunedex.flows.reembed import corpus_watch, nightly_reembed

    return {"nightly-reembed": nightly_reembed, "finetune": finetune, "evaluate-and-promote": evaluate_and_promote,
            "refresh": refresh, "corpus-watch": corpus_watch}


def deployments(cfg: TunedexConfig, config: str, overrides: list[str]) -> list[Any]:
    """One deployment per flow, named like the flow; overlapping runs of one deployment are cancelled
    (`CANCEL_NEW`): the run already going does the work."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    limit = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW,
                                   grace_period_seconds=SLOT_GRACE_SECONDS)
    crons = {"nightly-reembed": cfg.prefect.reembed_cron, "refresh": cfg.prefect.refresh_cron}
    # a corpus that lives elsewhere: post CORPUS_CHANGED (a Prefect webhook, `prefect event emit`) to re-embed now
    triggers = {"nightly-reembed": [DeploymentEventTrigger(expect={CORPUS_CHANGED})]}
    out = []
    for name, fn in flows().items():
        cron = crons.get(name)
        out.append(fn.to_deployment(
            name=name, parameters={"config": config, "overrides": overrides}, concurrency_limit=limit,
            schedules=[Cron(cron, timezone=cfg.prefect.timezone)] if cron else None, tags=["tunedex"],
            work_pool_name=cfg.prefect.work_pool, triggers=triggers.get(name),
        ))
    return out


def crash_detection(window_s: int) -> Any:
    """Prefect's zombie-run automation: a running flow run with no heartbeat for `window_s`
    (`prefect.crash_after_s`) is marked Crashed, which also frees its concurrency slot. A process killed with
    its worker (a lost machine or pod) has nobody else to report it; its engine would keep the slot's lease
    renewed for 300 s otherwise. The default 50 s is 1.6 heartbeats: a crash shows within 2 heartbeats (plus
    Prefect's 5 s evaluation tick), and a live run whose heartbeat is 19 s late is marked Crashed too (seen with
    busy loops on both cores beside the whole test suite). Prefect's docs use 90 s (3 heartbeats)."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    final = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=CRASH_DETECTION,
        description=f"flow runs emit a heartbeat every {HEARTBEAT_SECONDS} s (PREFECT_FLOWS_HEARTBEAT_FREQUENCY)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat"} | final,
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=window_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {window_s} s: its process died")],
    )


def apply_crash_detection(cfg: TunedexConfig) -> Any:
    """Create tunedex's crash-detection automation on the current Prefect API, or bring it up to date."""
    from prefect.automations import Automation

    wanted = crash_detection(cfg.prefect.crash_after_s)
    try:
        wanted.id = Automation.read(name=wanted.name).id
    except ValueError:  # not there yet
        return wanted.create()
    wanted.update()
    return wanted


def serve_deployments(cfg: TunedexConfig, config: str, overrides: list[str]) -> None:
    """`tunedex worker`: serve every deployment here; each run heartbeats, and runs that stop heartbeating
    are marked Crashed (see `crash_detection`)."""
    from prefect import serve

    apply_crash_detection(cfg)
    serve(*deployments(cfg, config, overrides), pause_on_shutdown=False, heartbeat_seconds=HEARTBEAT_SECONDS)
