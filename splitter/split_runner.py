"""One model evaluation across a plan: local front, then each remote stage in order.

The runner is what a sampler calls once per step. It knows routing only: how the plan
maps blocks to the local stage and to remote stages; how bytes move is the remote
stage's business (any object with `forward`, `reconfigure` and `node`).

Plan changes apply at step boundaries. `request_plan` (from any thread: a UI, a
ComfyUI node) queues a plan that the next call installs on every node before it
computes anything. A daemon may also have been moved by someone else (the panel):
its answer is then STALE_EPOCH with the plan it now follows, which the runner adopts
and retries, so the step still completes under one consistent plan.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from .context_hash import ids_hash
from .plan import LOCAL, Plan

log = logging.getLogger(__name__)

STALE_EPOCH = "stale_epoch"  # the code a remote's refusal carries when its plan is newer
PLAN_POLL_TIMEOUT_S = 1.0  # how long an all-local step waits to hear a remote's plan


@dataclass
class StepStats:
    step: int
    epoch: int
    n_blocks_remote: int
    local_s: float
    total_s: float
    hops: list = field(default_factory=list)  # HopStats of each remote


class SplitRunner:
    def __init__(self, local_stage, plan: Plan, remotes: dict | None = None):
        """`remotes`: node id -> remote stage (forward, reconfigure, current_plan), for every
        node the plan may name."""
        self.local = local_stage
        self.remotes = remotes or {}
        self.plan = plan
        self._pending: Plan | None = None
        self._lock = threading.Lock()
        self.stats: list[StepStats] = []
        self.steps_run = 0
        self._unreachable: set[str] = set()
        self._pe_cache: tuple[str, torch.Tensor] | None = None
        self._install(plan)

    # ---------------------------------------------------------------- plans

    def request_plan(self, plan: Plan) -> None:
        """Install `plan` at the next step boundary (thread-safe)."""
        with self._lock:
            self._pending = plan

    def _install(self, plan: Plan) -> None:
        for entry in plan.remotes:
            if entry.node not in self.remotes:
                raise ValueError(f"plan names node {entry.node!r}, which this runner has no connection to")
        # Remotes first: blocks a remote takes over are loaded there before the local
        # stage lets go of them, and vice versa; either way each node ends consistent.
        for node, remote in self.remotes.items():
            if node in {e.node for e in plan.remotes} or (self.plan and self.plan.range_of(node)):
                remote.reconfigure(plan)
        self.local.set_range(plan.local, first=True, last=plan.is_last(LOCAL))
        self.plan = plan
        log.info("plan epoch %d: local %s, %s", plan.epoch, plan.local,
                 ", ".join(f"{e.node} {e.blocks}" for e in plan.remotes) or "no remote")

    def _poll_remote_plans(self) -> None:
        """All-local steps send no FORWARD, so no STALE_EPOCH could tell us that someone
        (the panel) gave a daemon blocks again: ask each known remote for its plan, with a
        short deadline, and adopt a newer one. A remote that does not answer is skipped."""
        for node, remote in self.remotes.items():
            try:
                plan = remote.current_plan(timeout_s=PLAN_POLL_TIMEOUT_S)
            except Exception as exc:  # the generation goes on locally; say why once
                if node not in self._unreachable:
                    log.warning("cannot ask %s for its plan (%s); going on all-local", node, exc)
                    self._unreachable.add(node)
                continue
            self._unreachable.discard(node)
            if plan is not None and plan.get("epoch", -1) > self.plan.epoch:
                self._adopt(plan)
                return

    def _adopt(self, plan_dict: dict) -> None:
        plan = Plan.from_dict(plan_dict)
        log.info("a remote moved to plan epoch %d; adopting it", plan.epoch)
        self._install(plan)

    # ---------------------------------------------------------------- compute

    def __call__(self, img: torch.Tensor, txt: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                 txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """One model evaluation (the same signature as a whole `Flux2Stage`)."""
        step = self.steps_run
        self.steps_run += 1
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending != self.plan:
            self._install(pending)
        elif not self.plan.remotes:
            self._poll_remote_plans()
        for _ in range(3):  # a plan can move again while we adopt it; give up after a few
            try:
                return self._step(img, txt, timestep, img_ids, txt_ids, guidance, step)
            except Exception as exc:
                if getattr(exc, "code", None) != STALE_EPOCH or not getattr(exc, "plan", None):
                    raise
                self._adopt(exc.plan)
        raise RuntimeError("the plan kept changing during one step; try again")

    def _step(self, img, txt, timestep, img_ids, txt_ids, guidance, step) -> torch.Tensor:
        t0 = time.perf_counter()
        plan = self.plan
        key = ids_hash(txt_ids, img_ids)
        if self._pe_cache is None or self._pe_cache[0] != key:
            self._pe_cache = (key, self.local.rope(txt_ids, img_ids))
        ctx = self.local.context(timestep, guidance, txt_ids, img_ids, pe=self._pe_cache[1])
        hidden = self.local.run_blocks(self.local.embed(img, txt), ctx)
        if plan.is_last(LOCAL):
            out = self.local.finish(hidden, ctx)
            self.stats.append(StepStats(step, plan.epoch, 0, time.perf_counter() - t0, time.perf_counter() - t0))
            return out
        local_s = time.perf_counter() - t0
        hops = []
        for entry in plan.remotes:
            hidden, kind, hop = self.remotes[entry.node].forward(
                hidden, epoch=plan.epoch, step=step, timestep=timestep, guidance=guidance, txt_ids=txt_ids,
                img_ids=img_ids, ids_hash=key)
            hops.append(hop)
        if kind != "output":
            raise RuntimeError(f"the last node {plan.entries[-1].node} returned a {kind} instead of the model output")
        self.stats.append(StepStats(step, plan.epoch, plan.n_blocks_remote, local_s, time.perf_counter() - t0, hops))
        return hidden
