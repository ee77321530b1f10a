"""How honest the "weak match" marks are on a real index: one JSON line of rates.

    python scripts/bench_weak.py --index vclr-demo/index
    python scripts/bench_weak.py --index openmoji-index --attributes "a red heart,a smiling face"

- matched: of up to --captions captions drawn from the index whose top hit is their own image, the share marked
  weak (goal: at most 2%);
- attributes: short queries that name what the collection shows ("a red circle"): which top hits are weak (goal:
  none);
- unrelated: 30 queries about things the collection lacks ("pizza", "a city at night"): the share of top hits
  marked weak (goal: at least 90%). None of them is among the phrases the calibration uses
  (vclr.search.calibration.NULL_PHRASES), so the rule is not scored on what it was fitted to;
- with --vocabulary demo: 68 more short queries built from the demo's own words ("a {colour} {shape}" for every
  colour and shape of vclr.data.synthetic, "a big/small {shape}", "{colour} shapes"), those whose top hit is weak.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from vclr.search.calibration import NULL_PHRASES
from vclr.search.searcher import Searcher

UNRELATED = (
    "pizza", "a city at night", "a cat on a sofa", "a mountain lake", "a bowl of ramen", "a football stadium",
    "an old steam train", "a wedding dress", "a laptop keyboard", "a snowy forest road", "a surfer on a wave",
    "a violin", "a plate of sushi", "a skyscraper", "a horse in a meadow", "a tractor in a field",
    "a glass of red wine", "a dentist's chair", "a crowded market", "a lighthouse at dusk", "a toddler laughing",
    "an x-ray of a hand", "a bookshelf full of books", "a hot air balloon", "a frog on a leaf", "a motorcycle",
    "a candle-lit dinner", "a waterfall in a jungle", "an astronaut in space", "a chess board",
)
SHAPE_ATTRIBUTES = ("a red circle", "a big blue star", "a green square", "a small yellow triangle",
                    "a big red circle at the left", "a tiny white cross")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--captions", type=int, default=200, help="captions drawn from the index")
    parser.add_argument("--attributes", default=",".join(SHAPE_ATTRIBUTES),
                        help="comma-separated queries that name what the collection shows")
    parser.add_argument("--unrelated", default=",".join(UNRELATED),
                        help="comma-separated queries about things the collection lacks (default: 30 everyday ones; "
                             "check that none names what the collection shows)")
    parser.add_argument("--vocabulary", choices=["demo"], help="also score short queries built from these words")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unrelated = [q.strip() for q in args.unrelated.split(",") if q.strip()]
    assert not set(unrelated) & set(NULL_PHRASES), "the unrelated queries must not be calibration phrases"
    searcher = Searcher.open(args.index, load_model=False)
    index = searcher.index
    rng = np.random.default_rng(args.seed)
    live = index.live_ids("texts")
    drawn = np.sort(rng.choice(live, min(args.captions, len(live)), replace=False))
    texts, owners = index.store.texts(drawn), index.caption_image[drawn]
    tops = [hits[0] for hits in searcher.image_hits(searcher.embed_texts(texts), 1, "text")]
    matched = [hit for hit, owner in zip(tops, owners) if hit.id == owner]
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    attribute_tops = [hits[0] for hits in searcher.image_hits(searcher.embed_texts(attributes), 1, "text")]
    unrelated_tops = [hits[0] for hits in searcher.image_hits(searcher.embed_texts(unrelated), 1, "text")]
    vocabulary = demo_vocabulary() if args.vocabulary == "demo" else []
    vocabulary_tops = [hits[0] for hits in searcher.image_hits(searcher.embed_texts(vocabulary), 1, "text")] \
        if vocabulary else []
    print(json.dumps({
        "bench": "weak_marks", "index": args.index, "images": index.manifest["num_images"],
        "standout_threshold": round(searcher.weak_standout(), 4),
        "captions_drawn": len(drawn), "captions_top_hit_right": len(matched),
        "matched_marked_weak": round(float(np.mean([h.weak for h in matched])) if matched else 0.0, 4),
        "attributes": {a: {"score": round(h.score, 4), "weak": h.weak} for a, h in zip(attributes, attribute_tops)},
        "unrelated_marked_weak": round(float(np.mean([h.weak for h in unrelated_tops])), 4),
        "unrelated_queries": len(unrelated),
        "unrelated_scores": {q: round(h.score, 4) for q, h in zip(unrelated, unrelated_tops)},
        **({"vocabulary_queries": len(vocabulary),
            "vocabulary_weak": [q for q, h in zip(vocabulary, vocabulary_tops) if h.weak]} if vocabulary else {}),
    }))


def demo_vocabulary() -> list[str]:
    from vclr.data.synthetic import COLORS, SHAPES

    return [f"a {c} {shape}" for c in sorted(COLORS) for shape in SHAPES] + \
        [f"a {size} {shape}" for size in ("big", "small") for shape in SHAPES] + [f"{c} shapes" for c in sorted(COLORS)]


if __name__ == "__main__":
    main()
