"""Choice scores at serve time: ``combine``, which applies a profile's weights to the views'
scores of the choices (each view's rule, ``legion.engine.views.apply_rule``, is applied by the
agent that scores). No fitting here (that is ``legion.evaluation.calibrate``).
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


def contributions(profile: Profile, features: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """Each profiled agent's term in the combination: its weight times its log-softmax over the
    choices (agents not in ``features``, e.g. one that failed, are left out), in profile order."""
    return {a.name: a.weight * log_softmax(features[a.name]) for a in profile.agents if a.name in features}


def combine(profile: Profile, features: Mapping[str, Sequence[float]]) -> tuple[np.ndarray, dict[str, float]]:
    """``P(choice)`` under the profile from each agent's scores of the choices (agents not in
    ``features``, e.g. one that failed, are left out), and the weights used."""
    used = {a.name: a.weight for a in profile.agents if a.name in features}
    if not used:
        raise ValueError("none of the profile's agents scored the choices")
    z = np.asarray(sum(contributions(profile, features).values()), dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum(), used
