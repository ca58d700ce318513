"""How the answer-equivalence fallbacks judge 40 hand-picked short answer pairs (20 that say the
same thing, 20 that do not): the rules' verdict, the embedding similarity, and, with --judge,
the default agents' yes-probability (the bundled model, in this process). Prints one row per
pair and, for the pairs no rule decides, how many each fallback joins.

    python scripts/equivalence_pairs.py [--judge] [--config legion.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from legion.agent import Agent
from legion.arbitration.equivalence import AgentJudge, EmbeddingSimilarity, rule_verdict
from legion.config import load_config

SAME = [
    ("Paris", "paris, france"), ("Paris", "the city of Paris"), ("NYC", "New York City"),
    ("H2O", "water"), ("evaporation", "water evaporating"), ("the Sun", "sunlight"),
    ("photosynthesis", "plants making food from light"), ("a thermometer", "thermometer"),
    ("gravity", "the force of gravity"), ("yes", "correct"), ("USA", "United States"),
    ("Shakespeare", "William Shakespeare"), ("carbon dioxide", "CO2"), ("it melts", "melting"),
    ("dog", "puppy"), ("heat", "thermal energy"), ("lungs", "the lungs"),
    ("condensation", "water vapor condensing"), ("big", "large"), ("the moon", "Earth's moon"),
]  # fmt: skip
DIFFERENT = [
    ("Paris", "London"), ("red hen", "dog"), ("evaporation", "condensation"), ("the Sun", "the Moon"),
    ("gravity", "friction"), ("heat", "cold"), ("lungs", "heart"), ("yes", "no"), ("big", "small"),
    ("mammal", "reptile"), ("oxygen", "carbon dioxide"), ("a thermometer", "a barometer"),
    ("solid", "liquid"), ("north", "south"), ("photosynthesis", "respiration"), ("Mars", "Venus"),
    ("it melts", "it freezes"), ("winter", "summer"), ("plants", "animals"), ("Paris", "Lyon"),
]  # fmt: skip
THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


class _LocalAgents:
    """The configured agents in this process, behind ``Agents.score``."""

    def __init__(self, agents: list[Agent]):
        self._by_name = {a.cfg.name: a for a in agents}

    async def score(self, agent: str, task: str, context: str, continuations: list[str]):
        return await asyncio.to_thread(self._by_name[agent].score, task, context, continuations, 300)


async def _main(judge: bool, config: str | None) -> None:
    embedding = EmbeddingSimilarity()
    t0 = time.perf_counter()
    await embedding.similarity("warm", "up")  # loads the model
    print(f"embedding model loaded in {time.perf_counter() - t0:.1f} s")
    judges = None
    if judge:
        cfg = load_config(config)
        judges = AgentJudge(
            _LocalAgents([Agent(a, load_in_background=False) for a in cfg.agents]),
            [a.name for a in cfg.agents],
        )
    rows = []
    t_emb = t_judge = 0.0
    for label, pairs in (("same", SAME), ("different", DIFFERENT)):
        for a, b in pairs:
            v = rule_verdict(a, b)
            t = time.perf_counter()
            sim = await embedding.similarity(a, b)
            t_emb += time.perf_counter() - t
            p_yes, joined = None, None
            if judges is not None:
                t = time.perf_counter()
                p = await judges.yes_probabilities(a, b)
                t_judge += time.perf_counter() - t
                p_yes = sum(p.values()) / len(p)
                joined = 2 * sum(x > 0.5 for x in p.values()) > len(p)
            rows.append((label, a, b, v, sim, p_yes, joined))
            judged = "" if p_yes is None else f"  P(yes) {p_yes:.3f} {'joins' if joined else 'apart'}"
            print(f"{label:9s} {a!r:18s} {b!r:32s} rule {v.via:11s} similarity {sim:.3f}{judged}")
    n = len(rows)
    print(
        f"\nembedding {1000 * t_emb / n:.1f} ms per pair"
        + (f", judge {t_judge / n:.2f} s per pair" if judge else "")
    )
    for label in ("same", "different"):
        mine = [r for r in rows if r[0] == label]
        by_rules = sum(r[3].same is True for r in mine)
        open_ = [r for r in mine if r[3].same is None]
        print(f"\n{label}: {len(mine)} pairs, the rules join {by_rules}, decide {len(mine) - len(open_)}; "
              f"{len(open_)} undecided")  # fmt: skip
        for th in THRESHOLDS:
            print(f"  embedding >= {th}: joins {sum(r[4] >= th for r in open_)} of the undecided")
        if judge:
            print(f"  judge (majority of yes): joins {sum(bool(r[6]) for r in open_)} of the undecided")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", action="store_true", help="also ask the configured agents (loads the model)")
    ap.add_argument("--config", help="the agents' config (default: legion.yaml or the defaults)")
    args = ap.parse_args()
    asyncio.run(_main(args.judge, args.config))


if __name__ == "__main__":
    main()
