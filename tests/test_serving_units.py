"""Serving pieces without a cluster: the prompt format and the key check."""

from tunedex.demo_data import training_examples, make_policies
from tunedex.serving.app import authorized
from tunedex.serving.prompt import SYSTEM_PROMPT, build_messages
from tunedex.demo_data import SYSTEM_PROMPT as TRAINING_SYSTEM_PROMPT


def test_key_check():
    assert authorized("Bearer k3y", "k3y")
    for header in (None, "", "Bearer", "Bearer ", "Bearer k3y ", "bearer k3y", "Basic k3y", "Bearer K3Y"):
        assert not authorized(header, "k3y"), header


def test_serving_prompt_matches_the_training_format():
    assert SYSTEM_PROMPT == TRAINING_SYSTEM_PROMPT
    grounded = [ex for ex in training_examples([], make_policies(30, 50))]
    assert grounded  # policy examples are closed-book: same shape as a `finetuned` query
    assert build_messages("When is shipping free?", []) == grounded[1]["messages"][:1]
    msgs = build_messages("q?", ["first chunk", "second chunk"])
    assert msgs[0]["role"] == "system" and msgs[0]["content"].endswith("Context:\n[1] first chunk\n[2] second chunk")
    assert msgs[1] == {"role": "user", "content": "q?"}
