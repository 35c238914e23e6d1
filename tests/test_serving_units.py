"""Serving pieces without a cluster: the prompt format and the key check."""

from tunedex.demo_data import training_examples, make_policies
from tunedex.infra.prompt import SYSTEM_PROMPT, build_messages
from tunedex.serving.http import authorized


def test_key_check():
    assert authorized("Bearer k3y", "k3y")
    for header in (None, "", "Bearer", "Bearer ", "Bearer k3y ", "bearer k3y", "Basic k3y", "Bearer K3Y"):
        assert not authorized(header, "k3y"), header


def test_serving_prompt_matches_the_training_format():
    grounded = [ex for ex in training_examples([], make_policies(30, 50))]
    assert grounded  # policy examples are closed-book: same shape as a `finetuned` query
    shipping = next(ex for ex in grounded if ex["messages"][0]["content"] == "When is shipping free?")
    assert build_messages("When is shipping free?", []) == shipping["messages"][:1]
    msgs = build_messages("q?", ["first chunk", "second chunk"], nonce="n0nce")
    assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}  # retrieved text never goes in the system turn
    assert msgs[1] == {"role": "user", "content": '<document 1 nonce="n0nce">\nfirst chunk\n</document 1 nonce="n0nce">\n'
                                                  '<document 2 nonce="n0nce">\nsecond chunk\n</document 2 nonce="n0nce">\n'
                                                  "Question: q?"}


def test_batched_generation_gives_each_prompt_what_it_gets_alone():
    from tunedex.infra.config import FinetuneConfig
    from tunedex.infra.generation import Sampling, generate_batch
    from tunedex.workers import base_model as bm

    texts = ["Shipping is free on orders over 50 dollars.", "Returns are accepted within 30 days."] * 40
    tok = bm.train_tokenizer(texts, 300)
    tok.padding_side = "left"
    prompts = [[{"role": "user", "content": "hi"}], "Returns are", [{"role": "user", "content": "When is shipping free? " * 8}],
               [{"role": "system", "content": "Context: [1] Returns are accepted."}, {"role": "user", "content": "q"}]]
    samplings = [Sampling(max_new_tokens=n) for n in (12, 5, 20, 12)]
    for arch in ("gpt2", "llama"):
        model = bm.build_model(bm.model_spec(FinetuneConfig(tiny={"architecture": arch, "n_embd": 32, "n_head": 2},
                                                            max_length=128), tok))
        model.eval()
        alone = [generate_batch(model, tok, [p], [s], 32)[0] for p, s in zip(prompts, samplings)]
        together = generate_batch(model, tok, prompts, samplings, 32)
        assert together == alone, arch
        assert any(alone) and len(tok(alone[1])["input_ids"]) <= 5


def test_output_guard_withholds_the_instructions_and_neutralizes_images_and_foreign_links():
    from tunedex.infra.prompt import WITHHELD, GuardedStream, guard_answer

    secret = "You are a helper. Code ZX-991 is internal."
    assert guard_answer("Sure: You are a helper. Code ZX-991 is internal.", secret, []) == WITHHELD
    assert guard_answer("You are a helper.", secret, []) == "You are a helper."  # under 24 characters: not a leak
    assert guard_answer("see ![logo](http://x.example/a.png)", secret, []) == "see [image: logo]"
    sources = ["Manuals at https://docs.example.com/m1."]
    assert guard_answer("Read https://docs.example.com/m1. or http://evil.example/x", secret, sources) == \
        "Read https://docs.example.com/m1. or [link removed]"
    for answer in ("Read https://docs.example.com/m1 and http://evil.example/steal?q=1 now ok",
                   "![a](http://e.example/p) then plain text that runs on for a while",
                   "Thanks for asking! It costs $5. [1] You are a helper. Code ZX-991 is internal. more"):
        for size in (1, 2, 5):
            stream = GuardedStream(secret, sources)
            out = "".join(stream.feed(answer[i:i + size]) for i in range(0, len(answer), size)) + stream.close()
            whole = guard_answer(answer, secret, sources)
            # a stream stops where the leak starts: what went out before it is innocent text
            assert out.endswith(WITHHELD) if whole == WITHHELD else out.strip() == whole, (size, out)
            assert "ZX-991" not in out
