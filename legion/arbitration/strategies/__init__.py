"""Arbitration strategies, registered by name: ``get_strategy``/``build_strategy`` find them,
so a new one plugs in without touching the Arbiter or the actors.

One module per family: ``base`` (the protocols and shared helpers), ``voting`` (plurality,
trust, Borda, approval), ``equilibrium`` (the Consensus Game), ``learned`` (weights fitted by
``legion calibrate``), ``deliberation`` (debate, decomposition, conflict resolution). This
package imports them; none of them imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from legion.arbitration.strategies.base import (
    OptionScores,
    Session,
    SingleRound,
    Strategy,
    abstained,
    group_candidates,
    normalize_answer,
    representative_text,
    usable,
)
from legion.arbitration.strategies.deliberation import ConflictResolution, Debate, Decomposition
from legion.arbitration.strategies.equilibrium import EquilibriumRanking
from legion.arbitration.strategies.learned import Learned
from legion.arbitration.strategies.voting import Approval, Borda, Plurality, TrustWeighted
from legion.errors import UnknownStrategy

if TYPE_CHECKING:
    from legion.config import ArbiterConfig

__all__ = [
    "Approval",
    "Borda",
    "ConflictResolution",
    "Debate",
    "Decomposition",
    "EquilibriumRanking",
    "Learned",
    "OptionScores",
    "Plurality",
    "Session",
    "SingleRound",
    "Strategy",
    "TrustWeighted",
    "abstained",
    "build_strategy",
    "get_strategy",
    "group_candidates",
    "normalize_answer",
    "register",
    "representative_text",
    "strategy_names",
    "usable",
]

_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry under its ``name``."""
    _REGISTRY[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    """Return the registered strategy ``name`` or raise ``UnknownStrategy`` listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStrategy(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}",
            details={"allowed": sorted(_REGISTRY)},
        ) from None


def build_strategy(name: str, settings: ArbiterConfig | None = None) -> Strategy:
    """The strategy ``name`` with its parameters taken from ``settings``."""
    strategy = get_strategy(name)
    return strategy if settings is None else strategy.configure(settings)


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


for _strategy in (
    Plurality(),
    Borda(),
    Approval(),
    TrustWeighted(),
    EquilibriumRanking(),
    Learned(),
    Debate(),
    Decomposition(),
    ConflictResolution(),
):
    register(_strategy)
