"""``AgentPool``: the replicas of one agent, as the Arbiter sees them.

The Arbiter owns one pool per configured agent, so every ingress replica (which all talk to
the one Arbiter) shares the same agents. A pool looks like an actor handle to its caller
(``pool.generate.remote(req)`` returns an object ref) and sends each call to the replica with
the fewest calls in flight. ``autoscale`` grows the pool while the mean load per replica stays
above the target and shrinks it after an idle spell, within the agent's
``min_replicas``/``max_replicas``. A new replica asks Ray for the agent's ``num_cpus`` and
``num_gpus``: where the cluster has no room it waits as a pending actor, which is the demand
Ray's autoscaler answers by adding a node.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.placement import start_agent
from legion.config import AgentConfig, LegionConfig

log = logging.getLogger(__name__)

_WORK = frozenset({"generate", "generate_n", "score", "score_choices", "complete", "complete_stream"})


@dataclass
class _Replica:
    name: str
    handle: ray.actor.ActorHandle
    started: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    ready: bool = True  # an added replica takes calls once its model has loaded


class _Method:
    def __init__(self, pool: AgentPool, method: str):
        self._pool = pool
        self._method = method

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        return self._pool._call(self._method, args, kwargs)


class AgentPool:
    """Replicas of one agent; see the module docstring."""

    def __init__(self, cfg: LegionConfig, agent: AgentConfig, first_actor_name: str, namespace: str):
        self.cfg = cfg
        self.agent = agent
        self._namespace = namespace
        self._lock = threading.Lock()
        self._replicas: list[_Replica] = []
        self._first_name = first_actor_name
        self._busy_since: float | None = None
        self._idle_since: float | None = time.monotonic()
        self.scale_events: list[dict] = []
        for method in (
            "generate",
            "generate_n",
            "score",
            "score_choices",
            "complete",
            "health",
            "stats",
            "config",
            "wait_loaded",
        ):
            setattr(self, method, _Method(self, method))

    # ------------------------------------------------------------------ replicas
    def _ensure_first(self) -> None:
        if not self._replicas:
            handle = ray.get_actor(self._first_name, namespace=self._namespace)  # ValueError if gone
            self._replicas.append(_Replica(self._first_name, handle))
            # Replicas added by an earlier Arbiter incarnation are found again by name.
            for i in range(1, self.agent.max_replicas):
                name = f"{self._first_name}-{i}"
                try:
                    self._replicas.append(_Replica(name, ray.get_actor(name, namespace=self._namespace)))
                except ValueError:
                    break

    def _least_busy(self) -> _Replica:
        """The ready replica with the least work (the first one while none is ready); hold the lock."""
        self._ensure_first()
        ready = [r for r in self._replicas if r.ready] or self._replicas[:1]
        return min(ready, key=lambda r: (r.in_flight, r.started))

    def _call(self, method: str, args, kwargs) -> ray.ObjectRef:
        with self._lock:
            replica = self._least_busy()
            ref = getattr(replica.handle, method).remote(*args, **kwargs)
            if method not in _WORK:
                return ref
            replica.in_flight += 1

        def done(_):
            with self._lock:
                replica.in_flight -= 1

        ref.future().add_done_callback(done)
        return ref

    def stream(self, method: str, *args) -> tuple[Any, Callable[[], None]]:
        """``method`` as a Ray streaming generator on the replica with the least work, and the
        function to call when the stream is done (it counts as in flight until then)."""
        with self._lock:
            replica = self._least_busy()
            gen = getattr(replica.handle, method).options(num_returns="streaming").remote(*args)
            replica.in_flight += 1

        def release() -> None:
            with self._lock:
                replica.in_flight -= 1

        return gen, release

    @property
    def size(self) -> int:
        with self._lock:
            return len(self._replicas)

    def in_flight(self) -> int:
        with self._lock:
            return sum(r.in_flight for r in self._replicas)

    def capacity(self) -> int:
        """Calls the pool takes before its engines refuse work (running plus queued)."""
        return max(1, self.size) * (self.agent.n_parallel + self.agent.max_queue)

    def saturated(self) -> bool:
        return self.in_flight() >= self.capacity()

    def info(self) -> dict:
        with self._lock:
            return {
                "model_file": Path(self.agent.model_path).name if self.agent.model_path else self.agent.model,
                "replicas": [{"name": r.name, "in_flight": r.in_flight} for r in self._replicas],
                "min_replicas": self.agent.min_replicas,
                "max_replicas": self.agent.max_replicas,
                "scale_events": self.scale_events[-10:],
            }

    # ------------------------------------------------------------------ autoscaling
    def _room_for_one(self) -> bool:
        if self.cfg.arbiter.scale_beyond_cluster:
            return True
        free = ray.available_resources()
        a = self.agent
        need = {"CPU": a.num_cpus, "GPU": a.num_gpus, **a.resources}
        return all(free.get(k, 0.0) >= v for k, v in need.items() if v > 0)

    def autoscale(self, now: float | None = None) -> str | None:
        """One autoscaling decision; returns "up", "down" or None. Called periodically."""
        now = time.monotonic() if now is None else now
        a = self.agent
        with self._lock:
            try:
                self._ensure_first()
            except ValueError:
                return None
            n = len(self._replicas)
            load = sum(r.in_flight for r in self._replicas) / n
        if load > a.in_flight_target:
            self._idle_since = None
            self._busy_since = self._busy_since or now
            if n < a.max_replicas and now - self._busy_since >= a.upscale_delay_s and self._room_for_one():
                self._add(n)
                self._busy_since = None
                return "up"
        elif load == 0:
            self._busy_since = None
            self._idle_since = self._idle_since or now
            if n > a.min_replicas and now - self._idle_since >= a.downscale_delay_s:
                self._remove()
                self._idle_since = now
                return "down"
        else:
            self._busy_since = None
            self._idle_since = None
        return None

    def _add(self, index: int) -> None:
        a = self.agent
        name = f"{self._first_name}-{index}"
        handle = start_agent(self.cfg, a, name=name, extra=True)
        replica = _Replica(name, handle, ready=False)

        def loaded(_):
            replica.ready = True

        handle.wait_loaded.remote().future().add_done_callback(loaded)
        with self._lock:
            self._replicas.append(replica)
            self.scale_events.append({"at": time.time(), "action": "up", "replicas": len(self._replicas)})
        log.info("agent %s: added replica %s", a.name, name)

    def _remove(self) -> None:
        with self._lock:
            if len(self._replicas) <= 1:
                return
            victim = self._replicas[-1]
            if victim.in_flight:
                return
            self._replicas.pop()
            self.scale_events.append({"at": time.time(), "action": "down", "replicas": len(self._replicas)})
        ray.kill(victim.handle, no_restart=True)
        log.info("agent %s: removed idle replica %s", self.agent.name, victim.name)

    def kill_extra_replicas(self) -> list[str]:
        """Kill every replica but the first (for shutdown); returns their names."""
        with self._lock:
            extra, self._replicas = self._replicas[1:], self._replicas[:1]
        for r in extra:
            ray.kill(r.handle, no_restart=True)
        return [r.name for r in extra]
