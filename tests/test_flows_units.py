"""Flow and evaluation pieces without services: submission ids, the gate, scores, QA parsing, prefect.yaml."""

from __future__ import annotations

import importlib
import json

import pytest
import yaml

from conftest import REPO
from tunedex.flows.finetune import entrypoint, submission_id
from tunedex.infra.config import EvaluateConfig, TunedexConfig
from tunedex.workers.evaluate import EvalError, answer_scores, gate, load_qa, retrieval_scores


def test_submission_id_follows_config_and_data_but_not_the_run_name(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    cfg = TunedexConfig(finetune={"train_file": str(data)})
    first = submission_id(cfg)
    assert first.startswith("tunedex-ft-") and first == submission_id(cfg)
    assert submission_id(TunedexConfig(finetune={"train_file": str(data), "ray": {"run_name": "x"}})) == first
    assert submission_id(TunedexConfig(finetune={"train_file": str(data), "max_steps": 7})) != first
    data.write_text('{"text": "b"}\n')
    assert submission_id(cfg) != first
    with pytest.raises(FileNotFoundError, match="finetune.train_file"):
        submission_id(TunedexConfig(finetune={"train_file": str(tmp_path / "none.jsonl")}))


def test_job_entrypoint_is_the_cli_with_the_run_name_pinned():
    cmd = entrypoint(TunedexConfig(), "/cfg dir/t.yaml", ["finetune.max_steps=5"], "tunedex-ft-abc")
    assert cmd.endswith("-m tunedex.cli finetune '/cfg dir/t.yaml' --set finetune.max_steps=5 --set finetune.ray.run_name=tunedex-ft-abc")
    assert entrypoint(TunedexConfig(ray={"address": "ray://head:10001"}), "c.yaml", [], "r").startswith("python -m")


def test_gate_needs_the_minimum_and_no_regression_beyond_the_allowance():
    ev = EvaluateConfig(metric="f1", min_score=0.3, max_regression=0.05)
    assert not gate({"f1": 0.2}, None, ev).promote
    assert gate({"f1": 0.4}, None, ev).promote
    assert gate({"f1": 0.40}, {"f1": 0.44}, ev).promote
    refused = gate({"f1": 0.40}, {"f1": 0.50}, ev)
    assert not refused.promote and "max_regression" in refused.reason


def test_answer_and_retrieval_scores():
    s = answer_scores("Sure! The Aurora Headphones 100 costs $184.00. [1]", "The Aurora Headphones 100 costs $184.00.")
    assert s["contains"] == 1.0 and s["exact"] == 0.0 and 0.8 < s["f1"] < 1.0
    assert answer_scores("It costs $238.00.", "The Aurora Headphones 100 costs $184.00.")["contains"] == 0.0
    assert answer_scores("", "x") == {"exact": 0.0, "contains": 0.0, "f1": 0.0}
    # every source marker is dropped before scoring, [12] as well as [1] (serve.top_k may exceed 3)
    assert answer_scores("The Aurora Headphones 100 costs $184.00 [12].", "The Aurora Headphones 100 costs $184.00.")["exact"] == 1.0
    assert retrieval_scores(["a", "b", "c"], ("b",)) == {"recall": 1.0, "mrr": 0.5}
    assert retrieval_scores(["a"], ("b", "c")) == {"recall": 0.0, "mrr": 0.0}
    assert retrieval_scores(["a"], ()) == {}


def test_bad_qa_sets_are_reported_by_line(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text(json.dumps({"question": "q?", "answer": "a", "doc_ids": ["d"], "split": "static"}) + "\n\n")
    assert load_qa(good)[0].doc_ids == ("d",)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\nnot json\n{"question": "q", "answer": "a", "doc_ids": "d"}\n')
    with pytest.raises(EvalError, match=r"3 bad line\(s\): line 1: .*answer.*; line 2: .*; line 3: `doc_ids`"):
        load_qa(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalError, match="holds no questions"):
        load_qa(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9"}')
    with pytest.raises(EvalError, match="not UTF-8"):
        load_qa(tmp_path / "latin1.jsonl")
    with pytest.raises(EvalError, match="does not exist"):
        load_qa(tmp_path / "missing.jsonl")


def test_prefect_yaml_matches_the_flows_tunedex_schedules():
    from tunedex.flows.deploy import CORPUS_CHANGED, flows

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    known = flows()
    names = [d["name"] for d in spec["deployments"]]
    assert names == list(known)
    for d in spec["deployments"]:
        path, attr = d["entrypoint"].split(":")
        module = "tunedex." + path.removesuffix(".py").replace("/", ".")
        fn = getattr(importlib.import_module(module), attr)
        assert fn.name == d["name"] and fn is known[d["name"]]
        assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert spec["deployments"][0]["triggers"][0]["expect"] == [CORPUS_CHANGED]  # the re-embed on an event
    nightly = spec["deployments"][0]["schedules"][0]
    assert (nightly["cron"], nightly["timezone"]) == (TunedexConfig().prefect.reembed_cron, TunedexConfig().prefect.timezone)


def test_the_crash_window_comes_from_the_config_and_outlasts_a_heartbeat():
    from tunedex.flows.deploy import HEARTBEAT_SECONDS, crash_detection

    cfg = TunedexConfig.model_validate({"prefect": {"crash_after_s": 93}})
    automation = crash_detection(cfg.prefect.crash_after_s)
    assert automation.trigger.within.total_seconds() == 93 and "93 s" in automation.actions[0].message
    assert HEARTBEAT_SECONDS < TunedexConfig().prefect.crash_after_s < 2 * HEARTBEAT_SECONDS  # S11: within 2 beats
    with pytest.raises(ValueError, match="crash_after_s"):
        TunedexConfig.model_validate({"prefect": {"crash_after_s": HEARTBEAT_SECONDS}})
