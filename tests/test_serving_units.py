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


def test_requests_refused_before_routing_are_labelled_by_their_route():
    from fastapi.testclient import TestClient

    from tunedex.serving.app import api, route_label

    api.state.api_key = "k3y"
    labels: list[str] = []

    @api.middleware("http")
    async def spy(request, call_next):
        response = await call_next(request)
        labels.append(route_label(request))
        return response

    client = TestClient(api)
    statuses = [client.post("/v1/query", json={}).status_code, client.get("/no/such/route").status_code,
                client.get("/openapi.json").status_code]
    api.user_middleware.pop(0)  # the spy; the app's middleware stack is rebuilt on the next start
    api.middleware_stack = None
    assert statuses == [401, 401, 401]  # the key is checked before routing, on every route
    assert labels == ["/v1/query", "unmatched", "/openapi.json"]  # a bounded label set


def test_batched_generation_gives_each_prompt_what_it_gets_alone():
    from tunedex.infra.config import FinetuneConfig
    from tunedex.serving.generation import Sampling, generate_batch
    from tunedex.workers import finetune as ft

    texts = ["Shipping is free on orders over 50 dollars.", "Returns are accepted within 30 days."] * 40
    tok = ft.train_tokenizer(texts, 300)
    tok.padding_side = "left"
    prompts = [[{"role": "user", "content": "hi"}], "Returns are", [{"role": "user", "content": "When is shipping free? " * 8}],
               [{"role": "system", "content": "Context: [1] Returns are accepted."}, {"role": "user", "content": "q"}]]
    samplings = [Sampling(max_new_tokens=n) for n in (12, 5, 20, 12)]
    for arch in ("gpt2", "llama"):
        model = ft.build_model(ft.model_spec(FinetuneConfig(tiny={"architecture": arch, "n_embd": 32, "n_head": 2},
                                                            max_length=128), tok))
        model.eval()
        alone = [generate_batch(model, tok, [p], [s], 32)[0] for p, s in zip(prompts, samplings)]
        together = generate_batch(model, tok, prompts, samplings, 32)
        assert together == alone, arch
        assert any(alone) and len(tok(alone[1])["input_ids"]) <= 5
