"""Choice scores at serve time: the scoring rules that turn an agent's log-likelihoods of the
choices into scores (``scoring`` in its config), and ``combine``, which applies a profile's
weights to them. No fitting here (that is ``legion.evaluation.calibrate``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from legion.profile import Profile


def log_softmax(x: Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    m = a.max()
    return a - m - math.log(float(np.exp(a - m).sum()))


def apply_rule(
    rule: str,
    loglik: Sequence[float],
    n_tokens: Sequence[int],
    n_bytes: Sequence[int],
    reference: Sequence[float] | None = None,
) -> list[float]:
    """Each choice's score under ``rule`` (higher is better), on the scale of a summed
    log-likelihood: per-token and per-byte means are multiplied back by the choices' mean
    length, so a softmax over the scores is as sharp as one over raw log-likelihoods.
    ``reference`` is the log-likelihood after the premise (``pmi``) or the content-free
    prompt (``calibrated``)."""
    if rule == "sum":
        return list(loglik)
    if rule in ("per_token", "per_byte"):
        lengths = n_tokens if rule == "per_token" else n_bytes
        mean = sum(lengths) / len(lengths)
        return [x / max(1, n) * mean for x, n in zip(loglik, lengths, strict=True)]
    if rule in ("pmi", "calibrated"):
        if reference is None:
            raise ValueError(f"scoring rule {rule!r} needs the reference log-likelihoods")
        return [x - r for x, r in zip(loglik, reference, strict=True)]
    raise ValueError(f"unknown scoring rule {rule!r}")


def needs_reference(rule: str) -> bool:
    return rule in ("pmi", "calibrated")


def combine(profile: Profile, features: Mapping[str, Sequence[float]]) -> tuple[np.ndarray, dict[str, float]]:
    """``P(choice)`` under the profile from each agent's scores of the choices (agents not in
    ``features``, e.g. one that failed, are left out), and the weights used."""
    used = {a.name: a.weight for a in profile.agents if a.name in features}
    if not used:
        raise ValueError("none of the profile's agents scored the choices")
    z = sum(w * log_softmax(features[a]) for a, w in used.items())
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum(), used
