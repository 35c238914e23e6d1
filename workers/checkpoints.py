"""Checkpoints of a fine-tune run: every rank writes its DeepSpeed shards and a completion marker listing its
files' hashes; a checkpoint is loaded only when every marker is there and every hash matches, and a run
resumes from the newest complete one inside its own run dir."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from tunedex.infra.errors import TunedexError

log = logging.getLogger(__name__)

MARKER = "tunedex_rank{rank}.json"  # one per rank: the checkpoint is complete when every rank's is there
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a run name is one directory under the storage root


class CheckpointError(TunedexError, ValueError):
    """A run dir or checkpoint that must not be used (partial, altered, outside the run); names the fix."""


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("tunedex_rank")
    }


def verify_checkpoint(root: Path, world: int) -> dict[str, Any]:
    """Every rank's marker is there and every file it lists has its recorded hash; else refuse."""
    markers = []
    for rank in range(world):
        path = root / MARKER.format(rank=rank)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {root} lacks rank {rank}'s completion marker: it is partial; not loading it")
        markers.append(json.loads(path.read_text()))
    inside = root.resolve()
    for m in markers:
        if m["world"] != world:
            raise CheckpointError(f"checkpoint {root} was written by {m['world']} workers; resume with num_workers={m['world']}")
        for rel, digest in m["files"].items():
            f = root / rel
            if not f.resolve().is_relative_to(inside):  # a doctored marker must not make us read other files
                raise CheckpointError(f"checkpoint {root} lists {rel}, outside the checkpoint; not loading it")
            if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
                raise CheckpointError(f"checkpoint file {f} is missing or altered (hash mismatch); not loading it")
    return markers[0]


def run_dir(storage: Path, run_name: str) -> Path:
    """Where Ray Train keeps the run's checkpoints: one plain directory under the storage root."""
    if not RUN_NAME.fullmatch(run_name) or ".." in run_name:
        raise CheckpointError(
            f"finetune.ray.run_name {run_name!r} is not a plain name; use letters, digits, '.', '-' and '_' "
            f"(it names a directory under {storage})"
        )
    run = storage / run_name
    if run.exists() and not run.resolve().is_relative_to(storage.resolve()):
        raise CheckpointError(f"run dir {run} points outside the storage root {storage} (to {run.resolve()}); "
                            "remove the link or set another finetune.ray.run_name")
    return run


def check_resume_point(run: Path, world: int) -> int:
    """The step of the newest complete checkpoint an earlier attempt of this run left (0: none), checked
    before any worker starts.

    Every complete checkpoint (every rank's marker there) must lie inside the run dir and every file must have
    its recorded hash: Ray Train restores the last one it registered, which may be older than the newest on
    disk. A partial one (a rank's marker missing: the run stopped while writing it) was never registered by
    Ray Train; it is reported and ignored.
    """
    if not run.is_dir():
        return 0
    root, step = run.resolve(), 0
    for ckpt in sorted(p for p in run.glob("checkpoint_*") if p.is_dir()):
        if not ckpt.resolve().is_relative_to(root):
            raise CheckpointError(f"checkpoint {ckpt} points outside the run dir {root} (to {ckpt.resolve()}); "
                                "not resuming from it: remove it, or set another finetune.ray.run_name")
        if (ckpt / "metrics.json").is_file():
            continue  # the final export
        markers = sorted(ckpt.glob(MARKER.format(rank="*")))
        wrote = json.loads(markers[0].read_text())["world"] if markers else world
        missing = [r for r in range(wrote) if not (ckpt / MARKER.format(rank=r)).is_file()]
        if missing:
            log.warning("ignoring partial checkpoint %s: rank %s's completion marker is missing (the run stopped "
                        "while writing it)", ckpt, missing[0])
            continue
        step = max(step, int(verify_checkpoint(ckpt, world)["step"]))
    return step


class RayTrainIO:
    """Where the loop reports metrics and checkpoints: Ray Train (the other is the GPU check's local dir).

    `upload_delay_s` (a test hook) holds this worker's checkpoint upload back, so a run can be killed
    while only the other ranks' files have landed in storage.
    """

    def __init__(self, upload_delay_s: float = 0.0):
        self.upload_delay_s = upload_delay_s

    def latest(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return None if ckpt is None else ckpt.as_directory()

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_fn=self._delayed_upload if self.upload_delay_s else None)

    def _delayed_upload(self, checkpoint: Any, dir_name: str) -> Any:
        import ray.train

        time.sleep(self.upload_delay_s)
        return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)


def save_checkpoint(engine: Any, io: Any, rank: int, world: int, step: int, state: dict[str, Any], metrics: dict) -> None:
    """All ranks save their DeepSpeed shards, each writes its marker, and `io` gathers them."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ckpt", client_state=state)
        dist.barrier()
        marker = {"rank": rank, "world": world, "step": step, "files": file_hashes(Path(tmp))}
        Path(tmp, MARKER.format(rank=rank)).write_text(json.dumps(marker))
        io.report(metrics, tmp)


def load_checkpoint(engine: Any, io: Any, world: int) -> dict[str, Any] | None:
    latest = io.latest()
    if latest is None:
        return None
    with latest as d:
        if (Path(d) / "metrics.json").is_file():
            raise CheckpointError(f"the run's last checkpoint {d} is its final export: it already finished")
        verify_checkpoint(Path(d), world)
        _, state = engine.load_checkpoint(d, tag="ckpt")
    return state
