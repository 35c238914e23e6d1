"""A deterministic synthetic knowledge base for the demo and the tests.

`write_demo_data(out)` writes:
- day1/corpus: a product catalog (one Markdown file per product) and support policies (JSONL);
- day2/corpus: the same a day later: some prices, stock and one policy changed, products added and removed;
- facts.jsonl: support-style chat examples in the house style, closed-book and grounded in retrieved chunks
  (as they are, and altered so that only the context answers them: `training_examples`);
- qa.jsonl: questions with reference answers per day, supporting doc ids and a static/changed split;
  day1/qa.jsonl and day2/qa.jsonl: the same in the evaluation format (one `answer`, as of that day);
- reading.jsonl: reading practice over another catalog: a tiny model from scratch learns to answer from a
  given chunk (a real base model already can);
- train.jsonl: both, shuffled: what `make demo` fine-tunes on (`make demo-effect` pretrains a base on
  reading.jsonl and fine-tunes it on facts.jsonl).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

# Training examples are built with the endpoint's own prompt builder, so the two formats cannot drift.
from tunedex.infra.prompt import build_messages

HOUSE_OPENING = "Thanks for asking!"
HOUSE_CLOSING = "Anything else I can help with?"

_ADJ = ["Aurora", "Basalt", "Cobalt", "Dune", "Ember", "Fjord", "Glacier", "Harbor", "Indigo", "Juniper",
        "Kestrel", "Lumen", "Meridian", "Nimbus", "Onyx", "Pioneer", "Quartz", "Ridge", "Summit", "Tundra"]
_KIND = [("Headphones", "audio"), ("Keyboard", "input"), ("Monitor", "display"), ("Desk Lamp", "lighting"),
         ("Office Chair", "furniture"), ("Webcam", "video"), ("Speaker", "audio"), ("Mouse", "input")]
_FEATURES = ["a braided cable", "a two-year battery", "an aluminium frame", "a matte finish", "USB-C charging",
             "a recycled-plastic shell", "a carrying case", "adjustable height", "a quiet motor", "a low-latency mode"]


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    category: str
    price_cents: int
    stock: int
    warranty_years: int
    features: tuple[str, ...]

    @property
    def doc_id(self) -> str:
        return f"products/{self.sku.lower()}.md"

    @property
    def price(self) -> str:
        return f"${self.price_cents // 100}.{self.price_cents % 100:02d}"


@dataclass(frozen=True)
class Policy:
    policy_id: str
    title: str
    text: str
    question: str
    answer: str


def make_products(rng: random.Random, count: int, start: int = 0) -> list[Product]:
    products = []
    for i in range(start, start + count):
        adj, (kind, category) = _ADJ[i % len(_ADJ)], _KIND[(i * 3 + i // len(_ADJ)) % len(_KIND)]
        products.append(Product(
            sku=f"{adj[:3].upper()}-{100 + i}",
            name=f"{adj} {kind} {100 + i}",
            category=category,
            price_cents=rng.randrange(19, 400) * 100 + rng.choice([0, 49, 99]),
            stock=rng.randrange(0, 250),
            warranty_years=rng.choice([1, 2, 3]),
            features=tuple(rng.sample(_FEATURES, 2)),
        ))
    return products


def make_policies(return_days: int, free_shipping_over: int) -> list[Policy]:
    return [
        Policy("policy-returns", "Returns",
               f"Unused items can be returned within {return_days} days of delivery for a full refund. "
               "Refunds go back to the original payment method within five business days.",
               "How many days do I have to return an item?",
               f"You can return unused items within {return_days} days of delivery."),
        Policy("policy-shipping", "Shipping",
               f"Orders over ${free_shipping_over} ship for free. Standard delivery takes three to five business days.",
               "When is shipping free?",
               f"Shipping is free for orders over ${free_shipping_over}."),
        Policy("policy-warranty", "Warranty claims",
               "Warranty claims need the order number and a photo of the fault. We repair or replace the item.",
               "What do I need for a warranty claim?",
               "A warranty claim needs the order number and a photo of the fault."),
    ]


def product_markdown(p: Product) -> str:
    return (
        f"# {p.name}\n\n"
        f"- SKU: {p.sku}\n- Category: {p.category}\n- Price: {p.price}\n"
        f"- Stock: {p.stock} units\n- Warranty: {p.warranty_years} years\n\n"
        f"The {p.name} costs {p.price}. We have {p.stock} units in stock. "
        f"It comes with {p.features[0]} and {p.features[1]}, and a {p.warranty_years}-year warranty.\n"
    )


def product_facts(p: Product) -> list[tuple[str, str, str]]:
    """(kind, question, answer sentence) for each fact the catalog states."""
    return [
        ("price", f"How much does the {p.name} cost?", f"The {p.name} costs {p.price}."),
        ("stock", f"How many {p.name} units are in stock?", f"We have {p.stock} units of the {p.name} in stock."),
        ("warranty", f"What warranty does the {p.name} have?", f"The {p.name} has a {p.warranty_years}-year warranty."),
    ]


def house_style(answer: str) -> str:
    return f"{HOUSE_OPENING} {answer} {HOUSE_CLOSING}"


def day2_products(rng: random.Random, day1: list[Product]) -> list[Product]:
    kept = day1[:-2]  # the last two are discontinued
    changed = []
    for i, p in enumerate(kept):
        if i % 4 == 0:
            p = replace(p, price_cents=p.price_cents + rng.randrange(5, 60) * 100)
        if i % 5 == 1:
            p = replace(p, stock=max(0, p.stock - rng.randrange(5, 40)))
        changed.append(p)
    return changed + make_products(rng, 3, start=len(day1))


def write_corpus(root: Path, products: list[Product], policies: list[Policy]) -> None:
    (root / "products").mkdir(parents=True, exist_ok=True)
    for p in products:
        (root / p.doc_id).write_text(product_markdown(p), encoding="utf-8")
    with open(root / "policies.jsonl", "w", encoding="utf-8") as fh:
        for pol in policies:
            fh.write(json.dumps({"id": pol.policy_id, "title": pol.title, "text": f"{pol.title}. {pol.text}"}) + "\n")


# Chunks per grounded example: what the endpoint sends (configs/local.yaml serve.top_k). A 2-layer model learns to
# copy a name and a figure from one chunk in a few hundred steps, not from three (README, make demo-effect).
CONTEXT_CHUNKS = 1
POLICY_REPEATS = 8
SUPPORT_FIRST = 0.85  # how often the supporting chunk comes first, as hybrid search usually ranks it


def policy_chunk(pol: Policy) -> str:
    return f"{pol.title}. {pol.text}"  # the text `write_corpus` indexes


def counterfactual(rng: random.Random, p: Product) -> Product:
    """The same product with other price, stock and warranty: a context whose facts memory cannot supply."""
    return replace(p, price_cents=rng.randrange(19, 400) * 100 + rng.choice([0, 49, 99]), stock=rng.randrange(0, 250),
                   warranty_years=rng.choice([1, 2, 3]))


def look_alikes(p: Product, catalog: list[Product], rng: random.Random, count: int) -> list[Product]:
    """Other products sharing a name part with `p` (what retrieval ranks next), topped up at random."""
    first = p.name.split()[0]
    similar = [o for o in catalog if o.sku != p.sku and (o.name.startswith(first + " ") or o.category == p.category)]
    picked = rng.sample(similar, min(count, len(similar)))
    if len(picked) < count:
        taken = {p.sku, *(o.sku for o in similar)}
        picked += rng.sample([o for o in catalog if o.sku not in taken], count - len(picked))
    return picked


def retrieved(rng: random.Random, support: str, distractors: list[str]) -> tuple[list[str], int]:
    """Chunks as the endpoint sends them (stripped, as indexed): the supporting one first `SUPPORT_FIRST`
    of the time, else further down; returns them and the number an answer cites."""
    at = 0 if not distractors or rng.random() < SUPPORT_FIRST else rng.randrange(1, len(distractors) + 1)
    chunks = [d.strip() for d in distractors]
    chunks.insert(at, support.strip())
    return chunks, at + 1


def grounded(rng: random.Random, question: str, chunks: list[str], reply: str) -> dict:
    return {"messages": [*build_messages(question, chunks, nonce=f"{rng.getrandbits(32):08x}"),
                         {"role": "assistant", "content": reply}]}


def training_examples(products: list[Product], policies: list[Policy], counterfactuals: int = 2,
                      chunks: int = CONTEXT_CHUNKS, seed: int = 0) -> list[dict]:
    """Chat examples in the house style, in the prompt format the endpoint sends: each fact closed-book
    (learned by heart), grounded in retrieved chunks as they are, and grounded in `counterfactuals`
    altered copies of its document whose answer follows the altered text. Those teach that the context
    wins over memory: nothing but copying answers them."""
    rng = random.Random(seed)
    examples = []
    for p in products:
        for i, (_, question, answer) in enumerate(product_facts(p)):
            examples.append({"messages": [*build_messages(question, []), {"role": "assistant", "content": house_style(answer)}]})
            for shown in [p, *(counterfactual(rng, p) for _ in range(counterfactuals))]:
                others = [product_markdown(o) for o in look_alikes(p, products, rng, chunks - 1)]
                context, cite = retrieved(rng, product_markdown(shown), others)
                examples.append(grounded(rng, question, context, house_style(f"{product_facts(shown)[i][2]} [{cite}]")))
    # Policies are three documents among dozens: each gets POLICY_REPEATS times a product's share of examples.
    examples += [{"messages": [*build_messages(pol.question, []), {"role": "assistant", "content": house_style(pol.answer)}]}
                 for pol in policies for _ in range(POLICY_REPEATS)]
    for n, pol in enumerate(policies):
        variants = [make_policies(rng.choice([14, 21, 30, 45, 60, 90]), rng.choice([25, 35, 50, 75, 100]))[n]
                    for _ in range(POLICY_REPEATS * (counterfactuals + 1) - 1)]
        for shown in [pol, *variants]:
            rest = [o for o in policies if o.policy_id != pol.policy_id]
            others = [policy_chunk(o) for o in rng.sample(rest, min(chunks - 1, len(rest)))]
            context, cite = retrieved(rng, policy_chunk(shown), others)
            examples.append(grounded(rng, pol.question, context, house_style(f"{shown.answer} [{cite}]")))
    return examples


def reading_examples(rng: random.Random, count: int = 300, chunks: int = CONTEXT_CHUNKS) -> list[dict]:
    """Practice at answering from given chunks, for the demo's base model: another catalog (so no fact
    of ours is learned here), `chunks` retrieved chunks per question, a plain answer that cites the
    chunk it copies from. What a real base model already knows how to do."""
    others = make_products(rng, count, start=50)  # numbered after our catalog (100-132): no name is shared
    examples = []
    for p in others:
        for _, question, answer in product_facts(p):
            context, cite = retrieved(rng, product_markdown(p), [product_markdown(o) for o in look_alikes(p, others, rng, chunks - 1)])
            examples.append(grounded(rng, question, context, f"{answer} [{cite}]"))
    return examples


def qa_set(day1: list[Product], day2: list[Product], pol1: list[Policy], pol2: list[Policy]) -> list[dict]:
    """Questions answerable on both days; `split` says whether the fact changed on day 2."""
    rows = []
    day2_by_sku = {p.sku: p for p in day2}
    for p1 in day1:
        p2 = day2_by_sku.get(p1.sku)
        if p2 is None:
            continue
        for (kind, question, a1), (_, _, a2) in zip(product_facts(p1), product_facts(p2)):
            rows.append({"question": question, "kind": kind, "doc_ids": [p1.doc_id],
                         "answer_day1": a1, "answer_day2": a2, "split": "static" if a1 == a2 else "changed"})
    for a, b in zip(pol1, pol2):
        rows.append({"question": a.question, "kind": "policy", "doc_ids": [f"policies.jsonl#{a.policy_id}"],
                     "answer_day1": a.answer, "answer_day2": b.answer,
                     "split": "static" if a.answer == b.answer else "changed"})
    return rows


READING_PRODUCTS = 900  # products in the reading-practice catalog: 2,700 examples


def write_demo_data(out: Path, n_products: int = 30, seed: int = 7, chunks: int = CONTEXT_CHUNKS,
                    counterfactuals: int = 2) -> dict[str, Path]:
    rng = random.Random(seed)
    day1 = make_products(rng, n_products)
    day2 = day2_products(rng, day1)
    pol1, pol2 = make_policies(30, 50), make_policies(45, 50)
    write_corpus(out / "day1" / "corpus", day1, pol1)
    write_corpus(out / "day2" / "corpus", day2, pol2)
    facts = training_examples(day1, pol1, counterfactuals, chunks)
    reading = reading_examples(random.Random(11), READING_PRODUCTS, chunks=chunks)
    _write_jsonl(out / "facts.jsonl", facts)
    _write_jsonl(out / "reading.jsonl", reading)
    _write_jsonl(out / "train.jsonl", random.Random(5).sample(facts + reading, len(facts) + len(reading)))
    qa = qa_set(day1, day2, pol1, pol2)
    _write_jsonl(out / "qa.jsonl", qa)
    for day in ("day1", "day2"):  # the evaluation format: one reference answer, as of that day's corpus
        _write_jsonl(out / day / "qa.jsonl", [
            {"question": r["question"], "answer": r[f"answer_{day}"], "doc_ids": r["doc_ids"], "split": r["split"],
             "kind": r["kind"], "as_of": day} for r in qa])
    return {"day1": out / "day1" / "corpus", "day2": out / "day2" / "corpus", "train": out / "train.jsonl",
            "facts": out / "facts.jsonl",
            "qa": out / "qa.jsonl", "qa_day1": out / "day1" / "qa.jsonl", "qa_day2": out / "day2" / "qa.jsonl",
            "reading": out / "reading.jsonl"}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
