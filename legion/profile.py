"""The Arbiter's profile: the JSON file ``legion calibrate`` writes and ``arbiter.profile`` names.

A profile holds each agent's fitted weight and the view (``VIEW_FIELDS`` of its config) it was
fitted for, and the fit's data, size and cross-validation figures. This module is what a profile
*is*: its schema, reading it, and checking it against the configured agents (a running agent that
differs is a start-up error naming it). It sits in the shared ground because ``legion.config``
makes that check while it loads; ``legion.arbitration.scoring.combine`` applies the weights and
``legion.evaluation.calibrate`` fits them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from legion.errors import ConfigError

PROFILE_FORMAT = "legion-arbiter-profile"
PROFILE_VERSION = 1
# The agent fields that decide an agent's scores: a profile fitted for one view says nothing
# about another.
VIEW_FIELDS = (
    "model",
    "model_path",
    "role_prompt",
    "prompt_template",
    "few_shot",
    "few_shot_seed",
    "prompt_form",
    "scoring",
)


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProfileAgent(_StrictModel):
    name: str = Field(..., min_length=1, description="The agent's name in the config.")
    weight: float = Field(..., description="Its weight on its log-softmax over the choices.")
    temperature: float | None = Field(
        ..., description="1 / |weight| (None for weight 0): the temperature its distribution is read at."
    )
    view: dict[str, Any] = Field(..., description="The agent's view fields it was fitted for (VIEW_FIELDS).")
    train_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="Its own accuracy on the fit's items."
    )
    vote_points: float | None = Field(
        None,
        ge=0.0,
        le=1000.0,
        description="Mean points its own pick gains over the other choices in the fitted combination, on "
        "the fit's items (weight times the log-softmax gap; adaptive fan-out's measure of its sway).",
    )

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("view", mode="before")
    @classmethod
    def _model_before_names(cls, v: Any) -> Any:
        # Profiles written before agents named a packaged model ran the one there was then.
        if isinstance(v, dict) and "model" not in v:
            return {"model": "gemma-3-270m", **v}
        return v

    @field_validator("view")
    @classmethod
    def _view_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        missing = [f for f in VIEW_FIELDS if f not in v]
        extra = [f for f in v if f not in VIEW_FIELDS]
        if missing or extra:
            raise ValueError(
                f"must hold exactly {', '.join(VIEW_FIELDS)}; missing {missing}, unknown {extra}"
            )
        return v


class FitInfo(_StrictModel):
    method: Literal["conditional_logit", "dawid_skene"] = Field(
        ..., description="conditional_logit on labels, or on Dawid-Skene soft labels (no labels given)."
    )
    data: list[str] = Field(..., min_length=1, description="The training files.")
    items: int = Field(..., ge=1, description="Items the weights were fitted on.")
    items_per_file: dict[str, int] = Field(default_factory=dict)
    excluded_exemplars: int = Field(0, ge=0, description="Items left out: some agent's few-shot exemplars.")
    l2: float = Field(..., ge=0.0, description="The L2 penalty chosen by cross-validation.")
    folds: int = Field(..., ge=2)
    cv: list[dict[str, float]] = Field(..., description="Held-out log-loss and accuracy of every l2 tried.")
    cv_accuracy: float = Field(
        ...,
        ge=0.0,
        le=1.0,
        description="Held-out accuracy at the chosen l2 (dawid_skene: agreement with its labels).",
    )
    train_accuracy: float = Field(..., ge=0.0, le=1.0, description="Accuracy of the final fit on its items.")
    best_single: str = Field(..., description="The agent most accurate alone on the fit's items.")
    best_single_accuracy: float = Field(..., ge=0.0, le=1.0)
    fitted_at: str = Field(..., description="UTC time of the fit.")
    seconds: float = Field(0.0, ge=0.0)


class SwayCovariance(_StrictModel):
    """How the members' contributions to the fitted combination vary together on the fit's items:
    ``matrix[a][b]`` is the covariance of member ``a``'s and ``b``'s weighted log-softmax scores of
    a choice, each less its mean over the item's choices. Adaptive fan-out predicts from it what
    the members not asked yet would add, given what the asked ones said."""

    members: list[str] = Field(..., min_length=1, description="The members, in the matrix's order.")
    matrix: list[list[float]] = Field(..., description="Symmetric, one row per member.")
    items: int = Field(..., ge=1, description="Items it was estimated on.")

    @model_validator(mode="after")
    def _square(self) -> SwayCovariance:
        n = len(self.members)
        if len(set(self.members)) != n:
            raise ValueError("members must be unique")
        if len(self.matrix) != n or any(len(row) != n for row in self.matrix):
            raise ValueError(f"matrix must be {n} x {n}, one row and column per member")
        for i, row in enumerate(self.matrix):
            for j, v in enumerate(row):
                if not math.isfinite(v):
                    raise ValueError(f"matrix[{i}][{j}] must be a finite number")
                if abs(v - self.matrix[j][i]) > 1e-9 * max(1.0, abs(v)):
                    raise ValueError(f"matrix must be symmetric; [{i}][{j}] != [{j}][{i}]")
            if row[i] < 0:
                raise ValueError(f"matrix[{i}][{i}] is a variance and must be >= 0")
        return self


class AnswerPatterns(_StrictModel):
    """Which members wrote the same free-text answer on each of the fit's items: ``items[i][j]`` is
    the label of member ``j``'s answer on item ``i`` (members with equal labels wrote the same
    normalised answer; -1: it gave none), numbered in order of first appearance. Adaptive fan-out
    on free text reads from them how often the members not asked yet gather behind another answer
    than the present leader, given who agreed with whom so far (``legion calibrate --answers``)."""

    members: list[str] = Field(..., min_length=2, description="The members, in each item's order.")
    items: list[list[int]] = Field(..., min_length=1, description="One row of labels per item.")
    data: list[str] = Field(default_factory=list, description="The files the answers were read from.")

    @model_validator(mode="after")
    def _rows(self) -> AnswerPatterns:
        n = len(self.members)
        if len(set(self.members)) != n:
            raise ValueError("members must be unique")
        for i, row in enumerate(self.items):
            if len(row) != n:
                raise ValueError(f"items[{i}] has {len(row)} labels; one per member ({n}) is needed")
            if any(v < -1 for v in row):
                raise ValueError(f"items[{i}]: a label is a number >= 0, or -1 for no answer")
        return self


class Profile(_StrictModel):
    """What ``legion calibrate`` writes and the Arbiter loads (``arbiter.profile``)."""

    format: Literal["legion-arbiter-profile"] = Field(..., description=f"Always {PROFILE_FORMAT!r}.")
    version: int = Field(..., description=f"The profile format's version ({PROFILE_VERSION}).")
    agents: list[ProfileAgent] = Field(..., min_length=1)
    fit: FitInfo
    covariance: SwayCovariance | None = Field(
        None, description="The members' contributions' covariance (adaptive fan-out's prediction)."
    )
    answer_patterns: AnswerPatterns | None = Field(
        None, description="Who wrote the same free-text answer as whom on the fit's items (adaptive fan-out)."
    )

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != PROFILE_VERSION:
            raise ValueError(
                f"this Legion reads profile version {PROFILE_VERSION}; refit with legion calibrate"
            )
        return v

    @model_validator(mode="after")
    def _unique(self) -> Profile:
        names = [a.name for a in self.agents]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"agent names must be unique; {dup} appear twice")
        if self.covariance is not None:
            unknown = sorted(set(self.covariance.members) - set(names))
            if unknown:
                raise ValueError(f"covariance.members {unknown} are not agents of the profile")
        if self.answer_patterns is not None:
            unknown = sorted(set(self.answer_patterns.members) - set(names))
            if unknown:
                raise ValueError(f"answer_patterns.members {unknown} are not agents of the profile")
        return self

    @property
    def weights(self) -> dict[str, float]:
        return {a.name: a.weight for a in self.agents}

    def summary(self, path: str | None = None) -> dict[str, Any]:
        """What ``/v1/agents`` and the console show."""
        return {
            **({"path": path} if path else {}),
            "version": self.version,
            "method": self.fit.method,
            "weights": {a.name: round(a.weight, 4) for a in self.agents},
            "data": self.fit.data,
            "items": self.fit.items,
            "l2": self.fit.l2,
            "cv_accuracy": self.fit.cv_accuracy,
            "best_single": self.fit.best_single,
            "best_single_accuracy": self.fit.best_single_accuracy,
            "fitted_at": self.fit.fitted_at,
            # adaptive fan-out predicts the members not asked for `learned` when it has one
            "covariance": None
            if self.covariance is None
            else {"members": len(self.covariance.members), "items": self.covariance.items},
            # and on free text, from the members' answer patterns
            "answer_patterns": None
            if self.answer_patterns is None
            else {"members": len(self.answer_patterns.members), "items": len(self.answer_patterns.items)},
        }


def view_of(agent: Any) -> dict[str, Any]:
    """The fields of an agent config that decide its scores."""
    return {f: getattr(agent, f, None) for f in VIEW_FIELDS}


def _field_path(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err.get("loc", ())) or "(top level)"


def parse_profile(data: Any, source: str = "profile") -> Profile:
    """Validate profile data; a ``ConfigError`` names every bad field."""
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        lines = [f"{_field_path(e)}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        raise ConfigError(
            f"{source} is not a valid Arbiter profile:\n  "
            + "\n  ".join(lines)
            + "\n  (write one with legion calibrate)",
            details={"errors": lines},
        ) from None


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write ``profile`` to ``path`` whole or not at all: into a temporary file beside it, then
    renamed over it, so that a failed write (a full disk, an interrupt) never leaves a serving
    Legion a torn profile, even when ``path`` is the profile being refitted."""
    p = Path(path).expanduser()
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(profile.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def load_profile(path: str | Path) -> Profile:
    """The profile in the JSON file ``path`` (read again only when the file changes)."""
    p = Path(path).expanduser()
    try:
        stat = p.stat()
    except OSError:
        raise ConfigError(f"profile file {p} does not exist; write one with legion calibrate") from None
    return _load(str(p), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _load(path: str, _mtime_ns: int, _size: int) -> Profile:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"profile file {path} is not readable JSON: {exc}") from None
    return parse_profile(data, f"profile file {path}")


def check_agents(profile: Profile, agents: Sequence[Any], source: str = "the profile") -> None:
    """Raise ``ConfigError`` naming the agent when ``agents`` (agent configs) are not the ones
    the profile was fitted for: the same names, each with the same view."""
    fitted = {a.name: a for a in profile.agents}
    running = {a.name: a for a in agents}
    for name in running:
        if name not in fitted:
            raise ConfigError(
                f"agent {name!r} is not in {source} (fitted for {sorted(fitted)}): refit with legion "
                "calibrate for these agents, or remove arbiter.profile"
            )
    for name, pa in fitted.items():
        if name not in running:
            raise ConfigError(
                f"{source} was fitted for agent {name!r}, which is not configured: configure it or refit"
            )
        now = view_of(running[name])
        diff = [f for f in VIEW_FIELDS if now.get(f) != pa.view.get(f)]
        if diff:
            shown = ", ".join(f"{f}: {pa.view.get(f)!r} in the profile, {now.get(f)!r} now" for f in diff)
            raise ConfigError(
                f"agent {name!r} differs from the view {source} was fitted for ({shown}): refit"
            )
