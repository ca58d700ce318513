"""Multi-round strategies: debate, task decomposition and conflict resolution.

They call the agents more than once, through a ``Session`` that the Arbiter provides (and a
test may fake): ``fanout`` asks every agent the task, ``ask`` sends chosen agents chosen
requests in parallel, ``option_scores`` has every agent score every distinct answer, and
``trace`` records each step. Every round lands in the trace.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from legion.arbitration.strategies.base import Session, abstained, usable
from legion.arbitration.strategies.equilibrium import EquilibriumRanking
from legion.arbitration.strategies.voting import Plurality
from legion.messages import Candidate, Decision

if TYPE_CHECKING:
    from legion.config import ArbiterConfig

_LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*•]|subtask\s*\d*\s*:)\s*", re.IGNORECASE)


def _answers(candidates: Sequence[Candidate]) -> dict[str, str]:
    return {c.agent: c.normalized for c in candidates if c.ok and c.normalized}


def _debate_context(me: str, current: Mapping[str, Candidate]) -> str:
    lines = [
        f"- {c.role or c.agent}: {c.text.strip()}" for a, c in current.items() if a != me and c.ok and c.text
    ]
    mine = current.get(me)
    own = f"\nYour previous answer: {mine.text.strip()}" if mine is not None and mine.ok and mine.text else ""
    return (
        "Other agents answered this question:\n"
        + "\n".join(lines)
        + own
        + "\nWeigh their answers, then give your own best answer."
    )


class Debate:
    """Multi-round debate: each agent sees the others' latest answers and answers again; it
    stops as soon as every answering agent agrees, or after ``rounds`` rounds, and then the
    last answers are put to a plurality vote. An agent that fails in a later round keeps
    its previous answer."""

    name = "debate"
    needs_scores = False
    decides_choices = False
    adaptive_fanout = False
    uses_trust = False

    def __init__(self, rounds: int = 2):
        self.rounds = rounds

    def configure(self, settings: ArbiterConfig) -> Debate:
        return Debate(settings.debate_rounds)

    def decide(self, candidates, weights=None, scores=None) -> Decision:
        """Over answers already given (no further round possible): a plurality vote."""
        return Plurality().decide(candidates, weights, scores)

    async def deliberate(self, session: Session) -> Decision:
        first = await session.fanout()
        return await self.continue_from(session, first)

    async def continue_from(self, session: Session, first: Sequence[Candidate]) -> Decision:
        current = {c.agent: c for c in first}
        rounds_run = 0
        agreed = len(set(_answers(current.values()).values())) <= 1
        for r in range(1, self.rounds + 1):
            if agreed:
                break
            requests = {
                a: session.request(session.task, _debate_context(a, current))
                for a, c in current.items()
                if c.ok
            }
            replies = await session.ask(requests, step=f"debate_round_{r}")
            for c in replies:
                if c.ok and c.normalized:
                    current[c.agent] = c
            rounds_run = r
            answers = _answers(current.values())
            agreed = len(set(answers.values())) <= 1
            session.trace("debate_round", round=r, answers=answers, agreed=agreed)
        final = list(current.values())
        d = Plurality().decide(final, session.weights if self.uses_trust else None)
        d.details.update({"rounds": rounds_run, "agreed": agreed, "max_rounds": self.rounds})
        return d


def parse_subtasks(text: str, limit: int) -> list[str]:
    """Subtasks from a planner's reply: one per line, list marks stripped, duplicates and
    empty lines dropped, at most ``limit``."""
    out: list[str] = []
    for line in text.splitlines():
        item = _LIST_MARK.sub("", line).strip().strip('"').strip()
        if len(item) < 3 or item.lower() in (s.lower() for s in out):
            continue
        out.append(item)
        if len(out) >= limit:
            break
    return out


def assign_roles(subtasks: Sequence[str], roles: Mapping[str, str], planner: str) -> list[str]:
    """The agent for each subtask: one whose role (or name) the subtask mentions, else the
    agents other than the planner in turn (the planner too when it is the only agent)."""
    workers = [a for a in roles if a != planner] or list(roles)
    out = []
    turn = 0
    for sub in subtasks:
        words = set(re.findall(r"[\w-]+", sub.lower()))
        match = next((a for a in roles if roles[a].lower() in words or a.lower() in words), None)
        if match is None:
            match = workers[turn % len(workers)]
            turn += 1
        out.append(match)
    return out


class Decomposition:
    """Task decomposition: a planner agent (role ``planner``, else the first agent) splits
    the task into subtasks; each goes to an agent chosen by role, all in parallel; an
    integrator agent (role ``integrator`` or ``critic``, else the planner) writes the final
    answer from the parts. A task the planner does not split is answered by a plurality vote
    over every agent's direct answer."""

    name = "decompose"
    needs_scores = False
    decides_choices = False
    adaptive_fanout = False
    uses_trust = False

    def __init__(self, max_subtasks: int = 4):
        self.max_subtasks = max_subtasks

    def configure(self, settings: ArbiterConfig) -> Decomposition:
        return Decomposition(settings.decompose_max_subtasks)

    def decide(self, candidates, weights=None, scores=None) -> Decision:
        return Plurality().decide(candidates, weights, scores)

    @staticmethod
    def _pick(roles: Mapping[str, str], wanted: Sequence[str], default: str) -> str:
        for w in wanted:
            for a, r in roles.items():
                if r.lower() == w:
                    return a
        return default

    async def deliberate(self, session: Session) -> Decision:
        roles = dict(session.roles)
        planner = self._pick(roles, ("planner",), next(iter(roles)))
        plan_task = (
            f"Split this task into at most {self.max_subtasks} smaller independent questions, "
            f"one per line. Task: {session.task}"
        )
        [plan] = await session.ask({planner: session.request(plan_task)}, step="plan")
        subtasks = parse_subtasks(plan.text, self.max_subtasks) if plan.ok else []
        session.trace("plan", planner=planner, subtasks=subtasks, error=plan.error)
        if len(subtasks) < 2:
            session.trace("not_compound", reason="the planner gave fewer than two subtasks")
            d = Plurality().decide(await session.fanout())
            d.details.update({"decomposed": False})
            return d
        assignees = assign_roles(subtasks, roles, planner)
        # One agent may get several subtasks: send them in waves of one per agent.
        parts: list[Candidate | None] = [None] * len(subtasks)
        pending = list(range(len(subtasks)))
        wave = 0
        while pending:
            batch: dict[str, int] = {}
            for i in pending:
                batch.setdefault(assignees[i], i)
            wave += 1
            replies = await session.ask(
                {a: session.request(subtasks[i]) for a, i in batch.items()}, step=f"subtasks_{wave}"
            )
            for c in replies:
                parts[batch[c.agent]] = c
            pending = [i for i in pending if i not in batch.values()]
        session.trace(
            "subtasks",
            assigned=[
                {
                    "subtask": s,
                    "agent": a,
                    "answer": p.text if p and p.ok else None,
                    "error": p.error if p else None,
                }
                for s, a, p in zip(subtasks, assignees, parts, strict=True)
            ],
        )
        notes = "\n".join(
            f"{i + 1}. {s} -> {p.text.strip() if p and p.ok and p.text.strip() else '(no answer)'}"
            for i, (s, p) in enumerate(zip(subtasks, parts, strict=True))
        )
        integrator = self._pick(roles, ("integrator", "critic"), planner)
        [final] = await session.ask(
            {integrator: session.request(session.task, f"Answers to the parts of this task:\n{notes}")},
            step="integrate",
        )
        session.trace(
            "integrate", agent=integrator, answer=final.text if final.ok else None, error=final.error
        )
        if final.ok and final.normalized:
            answer, key = final.text.strip(), final.normalized
        else:
            answered = [p for p in parts if p is not None and p.ok and p.text.strip()]
            if not answered:
                usable([*(p for p in parts if p is not None), final])  # raises NoCandidates if all failed
                return abstained()
            answer = "; ".join(p.text.strip() for p in answered)
            key = answer.lower()
        return Decision(
            answer=answer,
            answer_key=key,
            votes={key: 1.0},
            ranking=[key],
            details={
                "decomposed": True,
                "planner": planner,
                "integrator": integrator,
                "subtasks": len(subtasks),
            },
        )


class ConflictResolution:
    """Plurality first; when the vote is split (the winner's share of the votes leads the
    runner-up's by less than ``margin``), a further round runs (``resolver``: equilibrium
    ranking over every agent's scores of every answer, or a debate) and decides instead."""

    name = "conflict"
    needs_scores = False
    decides_choices = True
    adaptive_fanout = True
    uses_trust = True

    def __init__(
        self, margin: float = 0.25, resolver: str = "equilibrium", settings: ArbiterConfig | None = None
    ):
        self.margin = margin
        self.resolver = resolver
        self.settings = settings

    def configure(self, settings: ArbiterConfig) -> ConflictResolution:
        return ConflictResolution(settings.conflict_margin, settings.conflict_resolver, settings)

    def _resolver(self, strategy: Debate | EquilibriumRanking):
        # The resolving strategy with this one's settings (its defaults when it has none).
        return strategy if self.settings is None else strategy.configure(self.settings)

    def split(self, first: Decision) -> tuple[bool, float]:
        """Whether ``first`` is a split vote, and the winner's lead in vote share."""
        total = sum(first.votes.values())
        if total <= 0 or len(first.ranking) < 2:
            return False, 1.0
        shares = sorted((v / total for v in first.votes.values()), reverse=True)
        lead = shares[0] - shares[1]
        return lead < self.margin, lead

    def decide(self, candidates, weights=None, scores=None) -> Decision:
        """Without agents to ask again: plurality, then equilibrium ranking on a split when
        option scores are given (the evaluation's path)."""
        first = Plurality().decide(candidates, weights)
        is_split, lead = self.split(first)
        if not is_split or scores is None or self.resolver != "equilibrium":
            first.details.update({"split": is_split, "lead": round(lead, 4), "resolved_by": None})
            return first
        d = self._resolver(EquilibriumRanking()).decide(candidates, weights, scores)
        d.details.update({"split": True, "lead": round(lead, 4), "resolved_by": "equilibrium"})
        return d

    async def deliberate(self, session: Session) -> Decision:
        cands = await session.fanout()
        first = Plurality().decide(cands, session.weights)
        is_split, lead = self.split(first)
        session.trace(
            "conflict_check", votes=first.votes, lead=round(lead, 4), margin=self.margin, split=is_split
        )
        if not is_split:
            first.details.update({"split": False, "lead": round(lead, 4), "resolved_by": None})
            return first
        if self.resolver == "debate":
            d = await self._resolver(Debate()).continue_from(session, cands)
        else:
            scores = await session.option_scores(cands)
            d = self._resolver(EquilibriumRanking()).decide(cands, session.weights, scores)
        session.trace(
            "conflict_resolution", resolver=self.resolver, winner=d.answer_key, first=first.answer_key
        )
        d.details.update({"split": True, "lead": round(lead, 4), "resolved_by": self.resolver})
        return d
