"""Do the explanations find what drives a score? Train DM²S² on ads whose label we planted.

A synthetic ads task whose label depends on two things only: the word ``clearance`` in the title,
or one of three deal categories (``outlet``, ``flash deals``, ``last chance``) among the category
ids. A positive ad carries exactly one of the two, a negative neither. Everything else is
distraction: the title's other words (the planted word sits at a random position among 5–14), the
other category ids (the planted id among 6–12), a description of 8–30 words that holds
``clearance`` itself in 30 % of all ads (a decoy: in the description it means nothing), and an
image of 49 random patch features. Ads miss modalities as real ads do: the image in 20 %, the
title, description or category each in 15 % (never the planted one).

The reference model (``hidden_size`` 32, one encoder layer) is trained with Adam on fresh ads every
step: embeddings, IntraMRA, InterMRA and head train, the encoder stays frozen at its random
initialisation (so that it does not move the evidence between elements: see docs/explain.md). It is
then converted to the engine (``dm2s2_fast.convert``) and the engine's explanations of 1024 held-out
ads are scored over the positive ones:

* ``planted_modality_top_beta``: the planted modality (the title for a ``clearance`` ad, the
  category for a deal ad) has the sample's largest β;
* ``planted_element_top3``: the planted element (the word, the id) is among the sample's 3 most
  important elements (``element_importance``).

Run ``python examples/planted_signal.py`` (12–16 s of CPU on one thread); ``--report``/``--png`` draw
six held-out ads (docs/explain/). ``tests/explain/test_fidelity.py`` runs it and holds both rates at
≥ 90 % and the accuracy at ≥ 95 %. The options ``--train-encoder``, ``--missing-rate`` and
``--decoy-rate`` reproduce the variants discussed in docs/explain.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dm2s2_fast as dm
from dm2s2_fast import DM2S2Config, Modality, SequenceSet
from dm2s2_fast.explain import explain, render_html, render_png, top_elements, top_modality
from dm2s2_fast.reference import DM2S2

PLANTED_WORD = "clearance"
WORDS = (
    "red blue black white green grey navy pink leather cotton wool linen denim steel wooden ceramic glass "
    "running hiking classic vintage modern slim large small mini portable wireless waterproof organic "
    "handmade premium soft warm light heavy kids women men unisex shoes boots sneakers jacket coat shirt "
    "dress jeans scarf hat bag backpack wallet watch lamp chair table desk sofa rug mug knife pan kettle "
    "blender speaker headphones phone case charger cable tent bike helmet ball set pack pair"
).split()
VOCAB = (PLANTED_WORD, *WORDS)  # token id = index: the planted word is id 0
CATEGORIES = (
    "outlet", "flash deals", "last chance",  # the planted ids 0, 1, 2
    "shoes", "apparel", "outerwear", "accessories", "bags", "watches", "jewellery", "home", "furniture",
    "lighting", "kitchen", "cookware", "appliances", "audio", "phones", "computers", "cameras", "gaming",
    "toys", "baby", "sports", "outdoor", "cycling", "camping", "fitness", "beauty", "health", "garden",
    "tools", "automotive", "books", "music", "office", "pets", "grocery", "travel", "gifts",
)
PLANTED_IDS = (0, 1, 2)
IMAGE_DIM, IMAGE_PATCHES = 8, 49


@dataclass(frozen=True)
class Task:
    decoy_rate: float = 0.3  # ads whose description holds the planted word
    missing_rate: float = 0.15  # per ad, each of title, description, category (never the planted one)
    image_rate: float = 0.8  # ads with an image


@dataclass
class Ads:
    batch: SequenceSet
    labels: torch.Tensor  # [B] float 0/1
    kind: list[str]  # per ad: "word" (the planted title word), "category" (a planted id) or "none"
    planted: list[tuple[str, int] | None]  # (modality, position) of the planted element
    decoy: list[bool]  # the planted word is in the description (where it does not count)


def make_config() -> DM2S2Config:
    return DM2S2Config(
        modalities=(Modality("title", "tokens"), Modality("description", "tokens"),
                    Modality("image", "dense", input_dim=IMAGE_DIM),
                    Modality("category", "categorical", num_embeddings=len(CATEGORIES))),
        vocab_size=len(VOCAB), hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
        max_positions=64, mra_hidden_size=32, head_hidden_size=32, num_outputs=1)


def make_ads(config: DM2S2Config, n: int, seed: int, task: Task = Task()) -> Ads:
    """n ads: a quarter with the planted word, a quarter with a planted id, half negatives."""
    g = torch.Generator().manual_seed(seed)

    def randint(low, high):  # [low, high)
        return int(torch.randint(low, high, (1,), generator=g))

    def chance(p):
        return float(torch.rand(1, generator=g)) < p

    def words(length):  # distractor words: never the planted one
        return torch.randint(1, len(VOCAB), (length,), generator=g)

    samples, labels, kinds, planted, decoys = [], [], [], [], []
    for _ in range(n):
        u = float(torch.rand(1, generator=g))
        kind = "word" if u < 0.25 else "category" if u < 0.5 else "none"
        title = words(randint(5, 15))
        description = words(randint(8, 31))
        decoy = chance(task.decoy_rate)
        if decoy:  # the planted word where it means nothing
            description[randint(0, description.numel())] = 0
        category = torch.randint(len(PLANTED_IDS), len(CATEGORIES), (randint(6, 13),), generator=g)
        where = None
        if kind == "word":
            where = ("title", randint(0, title.numel()))
            title[where[1]] = 0
        elif kind == "category":
            where = ("category", randint(0, category.numel()))
            category[where[1]] = PLANTED_IDS[randint(0, len(PLANTED_IDS))]
        sample = {"title": title, "description": description, "category": category}
        for name in ("title", "description", "category"):
            if chance(task.missing_rate) and (where is None or where[0] != name):
                del sample[name]
        if chance(task.image_rate):
            sample["image"] = torch.randn(IMAGE_PATCHES, IMAGE_DIM, generator=g)
        samples.append(sample)
        labels.append(float(kind != "none"))
        kinds.append(kind)
        planted.append(where)
        decoys.append(decoy and "description" in sample)
    return Ads(SequenceSet.from_samples(config, samples), torch.tensor(labels), kinds, planted, decoys)


def train(config: DM2S2Config, steps: int = 200, batch_size: int = 64, seed: int = 0, lr: float = 3e-3,
          task: Task = Task(), train_encoder: bool = False) -> DM2S2:
    """Adam on ``steps`` batches of fresh ads (none seen twice), from the model's own initialisation;
    the encoder frozen unless ``train_encoder``. Returns the model in eval mode."""
    torch.manual_seed(seed)
    model = DM2S2(config)
    for p in model.layers.parameters():
        p.requires_grad_(train_encoder)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        ads = make_ads(config, batch_size, seed=1_000_003 * (seed + 1) + step, task=task)
        loss = F.binary_cross_entropy_with_logits(model(ads.batch).logits[:, 0], ads.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _hit(record: dict, where: tuple[str, int]) -> tuple[bool, bool]:
    """(the planted modality has the largest β, the planted element is in the top 3 by importance)."""
    modality, position = where
    return (top_modality(record) == modality,
            any(e["modality"] == modality and e["position"] == position for e in top_elements(record, 3)))


def evaluate(engine, ads: Ads) -> tuple[dict, list[dict]]:
    """Accuracy and the two fidelity rates over the positive ads, from the engine's explanations."""
    out = engine(ads.batch)
    records = explain(out, ads.batch, VOCAB, labels={"category": CATEGORIES})
    correct = ((out.logits[:, 0] > 0).float() == ads.labels).float()
    positives = [b for b, kind in enumerate(ads.kind) if kind != "none"]
    decoys = [b for b, kind in enumerate(ads.kind) if kind == "none" and ads.decoy[b]]
    hits = {b: _hit(records[b], ads.planted[b]) for b in positives}
    metrics = {
        "samples": len(ads.kind), "positives": len(positives),
        "accuracy": float(correct.mean()),
        "accuracy_decoy_negatives": float(correct[decoys].mean()) if decoys else None,
        "planted_modality_top_beta": sum(h[0] for h in hits.values()) / len(positives),
        "planted_element_top3": sum(h[1] for h in hits.values()) / len(positives),
    }
    for kind in ("word", "category"):
        of_kind = [b for b in positives if ads.kind[b] == kind]
        metrics[f"{kind}_planted_modality_top_beta"] = sum(hits[b][0] for b in of_kind) / len(of_kind)
        metrics[f"{kind}_planted_element_top3"] = sum(hits[b][1] for b in of_kind) / len(of_kind)
        metrics[f"{kind}_mean_planted_alpha"] = sum(
            next(m for m in records[b]["modalities"] if m["name"] == ads.planted[b][0])["elements"]
            [ads.planted[b][1]]["alpha"] for b in of_kind) / len(of_kind)
    return metrics, records


@contextlib.contextmanager
def one_thread():
    """The tensors here are tiny (64 ads × ~60 elements × 32 features): one thread runs them faster
    than two that wait on each other, and far faster where the cores are shared (2-core CPU, busy:
    30 steps took 6–9 s on one thread, 47–55 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(seed: int = 0, steps: int = 200, test_size: int = 1024, backend: str = "auto", task: Task = Task(),
        train_encoder: bool = False) -> dict:
    """Train, convert, evaluate on held-out ads. Returns ``{"metrics", "model", "engine", "test", "records"}``."""
    with one_thread():
        return _run(seed, steps, test_size, backend, task, train_encoder)


def _run(seed, steps, test_size, backend, task, train_encoder) -> dict:
    start = time.perf_counter()
    config = make_config()
    model = train(config, steps, seed=seed, task=task, train_encoder=train_encoder)
    trained = time.perf_counter()
    test = make_ads(config, test_size, seed=seed, task=task)  # training seeds are 1_000_003·(seed+1)+step
    engine = dm.convert(model, backend)
    metrics, records = evaluate(engine, test)
    with torch.no_grad():
        reference = model(test.batch).logits.double()
    engine_logits = engine(test.batch).logits.double()
    metrics["engine_vs_reference_logits"] = float((engine_logits - reference).norm() / reference.norm())
    metrics["backends"] = "+".join(sorted(set(engine.last_backends.values())))
    metrics["train_seconds"] = trained - start
    metrics["total_seconds"] = time.perf_counter() - start
    return {"metrics": metrics, "model": model, "engine": engine, "test": test, "records": records}


def report_samples(test: Ads) -> list[int]:
    """Two ads with the planted word, two with a planted id, a negative with the decoy, a plain negative."""
    chosen = []
    for kind in ("word", "category"):
        chosen += [b for b, k in enumerate(test.kind) if k == kind][:2]
    negatives = [b for b, k in enumerate(test.kind) if k == "none"]
    chosen += [b for b in negatives if test.decoy[b]][:1] + [b for b in negatives if not test.decoy[b]][:1]
    return sorted(chosen)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--train-encoder", action="store_true", help="train the encoder layer too")
    parser.add_argument("--missing-rate", type=float, default=Task.missing_rate)
    parser.add_argument("--decoy-rate", type=float, default=Task.decoy_rate)
    parser.add_argument("--report", metavar="HTML", help="write an explanation report of six held-out ads")
    parser.add_argument("--png", metavar="PNG", help="the same report as a PNG (needs matplotlib)")
    parser.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    args = parser.parse_args(argv)
    task = Task(decoy_rate=args.decoy_rate, missing_rate=args.missing_rate)
    result = run(seed=args.seed, steps=args.steps, backend=args.backend, task=task,
                 train_encoder=args.train_encoder)
    metrics = result["metrics"]
    for key, value in metrics.items():
        print(f"{key:36s} {value:.4f}" if isinstance(value, float) else f"{key:36s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "metrics": metrics}, f, indent=1)
    if args.report or args.png:
        test = result["test"]
        chosen = report_samples(test)
        records = [result["records"][b] for b in chosen]
        what = {"word": f"'{PLANTED_WORD}' in the title", "category": "a deal category"}
        title = "DM²S² explanations: the planted-signal model (examples/planted_signal.py)"
        notes = [
            f"A model trained on synthetic ads whose label is planted: positive if and only if the title holds "
            f"'{PLANTED_WORD}' or the category ids hold a deal category "
            f"({', '.join(CATEGORIES[i] for i in PLANTED_IDS)}); '{PLANTED_WORD}' in the description is a decoy "
            f"that does not count, and the image patches are noise. Shown: held-out ads "
            + "; ".join(f"{b} ({what[test.kind[b]] if test.kind[b] != 'none' else 'negative' + (', with the decoy' if test.decoy[b] else '')})"
                        for b in chosen) + ".",
            f"Over all {metrics['samples']} held-out ads: accuracy {metrics['accuracy']:.3f}. Over the "
            f"{metrics['positives']} positive ones, the planted modality has the largest β in "
            f"{100 * metrics['planted_modality_top_beta']:.1f} % and the planted element is among the 3 most important "
            f"in {100 * metrics['planted_element_top3']:.1f} % (seed {args.seed}, {args.steps} steps; engine backend "
            f"{metrics['backends']}).",
        ]
        if args.report:
            render_html(records, args.report, title=title, notes=notes)
            print(f"wrote {args.report}")
        if args.png:
            render_png(records, args.png, title=title, notes=notes)
            print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
