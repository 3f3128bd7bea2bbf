"""`invariants`: properties of a correct distributed training step, verified while it trains
(`[debug] invariants = true`, or `[callbacks] enabled = ["invariants"]`).

At step 1, at the first step after a start or a rollback, and every `every` steps (default
`debug.invariants_every`), every rank checks:

    replicas identical   ranks that must hold the same local values of a parameter do:
                         data-parallel replicas (HSDP's dp_replicate, or plain replicas) and
                         tensor-parallel ranks of a `Replicate`-placed DTensor. FSDP shards are
                         not replicas: ranks are compared only where every non-`Replicate`
                         placement puts them at the same coordinate (and in the same stage).
                         Fingerprint of a local tensor: the int64 sum of its bit patterns (exact)
                         and its float64 sum of squares.
    disjoint data        the windows the data-parallel ranks read for the step are disjoint
                         (a window may recur only as often as the global batch spans epochs), and
                         the tp / pp ranks of one data-parallel rank read the same ones
    loss normaliser      the module's 1 / `_loss_scale` equals the global count of predicted
                         tokens, recounted from the targets the module was given, summed over
                         one rank per data-parallel rank
    optimizer steps      every parameter's optimizer `state["step"]` equals the updates applied
                         (steps minus updates the guard discarded: a discarded update does not
                         advance AdamW's step, fused or not), minus the updates it missed if it
                         started late (a fork's new tensors); equal on every rank

One all-gather (over the world, on the device) of a fixed-length vector per rank carries
everything; every rank then evaluates the same numbers, so all ranks agree on the verdict. A
violation is recorded in events.jsonl (`kind = "invariant"`) and ends the run on every rank with
one line naming the invariant, the step and the ranks (an `InvariantViolation`, a KilnError).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kiln.errors import ConfigError, KilnError
from kiln.objectives import IGNORE
from kiln.parallel.mesh import DIM_NAMES
from kiln.parallel.tensors import local as _local
from kiln.parallel.tensors import plain_name as _clean
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView

REPLICAS, DATA, NORMALISER, OPT_STEPS = "replicas identical", "disjoint data", "loss normaliser", "optimizer steps"
SUMSQ_RTOL = 1e-10  # float64 sums of squares of identical tensors differ only by reduction order
RELATION = {
    "pp": "pipeline ranks",
    "dp_replicate": "data-parallel replicas",
    "dp_shard": "data-parallel ranks",
    "tp": "tensor-parallel ranks",
}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
HEADER_F, HEADER_I = 3, 3  # floats: count, normaliser, discarded; ints: dp rank, has data, local error


class InvariantViolation(KilnError):
    """A runtime invariant of distributed training does not hold."""

    def __init__(self, invariant: str, step: int, detail: str, ranks: list[int]):
        self.invariant, self.step, self.detail, self.ranks = invariant, step, detail, ranks
        super().__init__(f"invariant '{invariant}' violated at step {step}: {detail}")


@dataclass
class InvariantsOptions:
    every: int = 0  # check every N steps (and at step 1); 0 = debug.invariants_every

    def check(self) -> None:
        if self.every < 0:
            raise ConfigError(f"callbacks.invariants.every must be >= 0 (0 = debug.invariants_every), got {self.every}")


def replica_key(p: torch.Tensor) -> tuple:
    """What a rank's local part of `p` is determined by besides its name and stage: its
    coordinate on every mesh dimension that does not replicate `p`. Ranks with equal keys must
    hold identical local tensors (a plain tensor: every rank of the stage)."""
    if not isinstance(p, DTensor):
        return ()
    mesh = p.device_mesh
    names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
    return tuple((names[i], mesh.get_local_rank(i)) for i, place in enumerate(p.placements) if not place.is_replicate())


def fingerprint(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 sum of the bit patterns, float64 sum of squares) of a local tensor, on its device."""
    t = t.detach()
    if not t.is_floating_point():
        t = t.double()
    bits = t.view(BITS[t.element_size()]).sum(dtype=torch.int64)
    return bits, torch.linalg.vector_norm(t, dtype=torch.float64).square()


def _list(values, limit: int = 4) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (+{len(values) - limit} more)" if len(values) > limit else "")


class Invariants(Callback):
    """Verify replicas, disjoint data, the loss normaliser and optimizer step counts while training."""

    name = "invariants"
    Options = InvariantsOptions

    def __init__(self, options: InvariantsOptions | None = None):
        super().__init__(options or InvariantsOptions())
        self.every = self.options.every or 50
        self.checks = 0  # checks passed in this process
        self.discarded: torch.Tensor | float = 0.0  # updates the guard flagged (summed on the device)
        self.late: dict[str, int] = {}  # parameter -> updates it missed (it started after step 0)
        self.calibrate = False  # the baseline of optimizer steps is unknown (state predates this callback)
        self._loaded = False
        self.first_check = 1
        self._capture = -1  # the step (0-based) whose batch and normaliser are captured
        self._data: dict[str, Any] = {}

    # ---------------------------------------------------------------- schedule
    def due(self, step: int) -> bool:
        """Check after completed step `step`."""
        return step == 1 or step == self.first_check or step % self.every == 0

    # ---------------------------------------------------------------- setup
    def on_run_start(self, trainer: RunView) -> None:
        if not self.options.every:
            debug = getattr(trainer.cfg, "debug", None)
            self.every = getattr(debug, "invariants_every", 50) or 50
        par, module = trainer.par, trainer.module
        self.device = par.device
        self.discarded = torch.as_tensor(float(self.discarded), dtype=torch.float64, device=self.device)
        if trainer.step > 0 and not self._loaded:
            self.calibrate = True  # resumed from a checkpoint written without this callback
        self._loaded = False
        self.first_check = trainer.step + 1

        # this rank's parameters: (stage, name) in a fixed order, with the optimizer that steps each
        self.params: list[tuple[str, torch.Tensor, torch.optim.Optimizer | None]] = []
        stage_ids = list(getattr(module, "stage_ids", [0]))
        for i, part in enumerate(module.parts):
            opt = module.optimizers[i] if i < len(module.optimizers) else None
            stage = stage_ids[i] if i < len(stage_ids) else i
            for name, p in part.named_parameters():
                self.params.append((f"{stage}:{_clean(name)}", p, opt))
        if par.mesh is not None:
            coords = tuple(par.mesh.get_local_rank(d) for d in DIM_NAMES)
        else:
            coords = (0,) * len(DIM_NAMES)
        mine = {
            "coords": coords,
            "dp": par.dp[0],
            "names": [n for n, _, _ in self.params],
            "keys": [replica_key(p) for _, p, _ in self.params],
            "trained": [p.requires_grad for _, p, _ in self.params],
        }
        if par.distributed:
            metas: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(metas, mine)
        else:
            metas = [mine]
        self.metas = metas
        self.world = len(metas)
        self.n_params = max(len(m["names"]) for m in metas)
        self.local_batch = trainer.sampler.local_batch
        # the ranks that must hold identical copies of each parameter: (rank, index) per group
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for r, m in enumerate(metas):
            for i, (name, key) in enumerate(zip(m["names"], m["keys"])):
                groups.setdefault((name, key), []).append((r, i))
        self.groups = [(name, members) for (name, _), members in groups.items() if len(members) > 1]
        if trainer.new_tensors and not self.calibrate:  # a fork's new tensors start counting now
            new, applied = set(trainer.new_tensors), trainer.step - int(round(float(self.discarded)))
            for m in metas:
                for name in m["names"]:
                    if name.split(":", 1)[1] in new and name not in self.late:
                        self.late[name] = applied
        self.dp_members: dict[int, list[int]] = {}
        for r, m in enumerate(metas):
            self.dp_members.setdefault(m["dp"], []).append(r)

    def on_batch(self, trainer: RunView, step: int, data_index: int, windows: torch.Tensor) -> torch.Tensor:
        if step == self._capture:  # the targets the step counts (the objective's batch is a pure function)
            batch = trainer.module.objective.make_batch(
                windows, data_index, trainer.cfg.train.seed, first_index=trainer.sampler.offset
            )
            self._data["count"] = (batch.targets != IGNORE).sum()
        return windows

    def on_after_backward(self, trainer: RunView, step: int) -> None:
        if step == self._capture:
            self._data["normaliser"] = trainer.module.loss_scale  # what the step's losses were divided by

    def on_optimizer_step(self, trainer: RunView, step: int, discard: torch.Tensor | None) -> None:
        if discard is not None:  # summed on the device: no host sync
            self.discarded = self.discarded + discard.detach().to(self.device, torch.float64).reshape(())

    # ---------------------------------------------------------------- events
    def on_step_start(self, trainer: RunView, step: int, data_index: int) -> None:
        if not self.due(step + 1):
            return
        sampler = trainer.sampler
        self._capture = step
        B = sampler.global_batch
        first = data_index * B
        # text windows repeat each epoch (a batch may wrap one); the image-text stream's window
        # indices are global over epochs and never repeat
        n = len(sampler.windows) if hasattr(sampler, "windows") else None
        self._data = {
            "index": data_index,
            "samples": np.asarray(sampler.sample_indices(data_index), dtype=np.int64),
            "epochs": (first + B - 1) // n - first // n + 1 if n else 1,
        }

    def on_step_verify(self, trainer: RunView) -> None:
        if not self.due(trainer.step):
            return
        with trainer.paused("invariants"):
            self.check(trainer)

    def on_guard_event(self, trainer: RunView, event: dict[str, Any]) -> None:
        if event.get("kind") == "rollback":
            if not self._loaded:  # the checkpoint rolled back to has no state of this callback
                self.calibrate = True
            self._loaded = False
            self.first_check = trainer.step + 1

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        summary["invariant_checks"] = self.checks

    def state_dict(self) -> dict[str, Any]:
        return {"discarded": int(round(float(self.discarded))), "late": dict(self.late)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.discarded = torch.as_tensor(
            float(state.get("discarded", 0)), dtype=torch.float64, device=getattr(self, "device", "cpu")
        )
        self.late = {k: int(v) for k, v in state.get("late", {}).items()}
        self.calibrate = False
        self._loaded = True

    # ---------------------------------------------------------------- the check
    def _local_vector(self, trainer: RunView) -> torch.Tensor:
        dev, P = self.device, self.n_params
        data = self._data if self._capture == trainer.step - 1 else {}
        has_data = "count" in data
        floats = torch.zeros(HEADER_F + 3 * P, dtype=torch.float64, device=dev)
        ints = torch.zeros(HEADER_I + self.local_batch + P, dtype=torch.int64, device=dev)
        if has_data:
            floats[0] = data["count"].to(dev, torch.float64)
            scale = data["normaliser"]
            floats[1] = math.nan if scale is None else 1.0 / scale.detach().to(dev, torch.float64)
            ints[HEADER_I : HEADER_I + self.local_batch] = torch.from_numpy(data["samples"]).to(dev)
        floats[2] = self.discarded
        ints[0], ints[1] = self.metas[trainer.par.info.rank]["dp"], int(has_data)
        steps, sums, bitsums = [], [], []
        for _, p, opt in self.params:
            state = opt.state.get(p) if opt is not None else None
            step = state.get("step") if state else None
            steps.append(torch.as_tensor(-1.0 if step is None else step).to(dev, torch.float64).reshape(()))
            bits, sq = fingerprint(_local(p))
            bitsums.append(bits.to(dev))
            sums.append(sq.to(dev))
        n = len(self.params)
        if n:
            floats[HEADER_F : HEADER_F + n] = torch.stack(steps)
            floats[HEADER_F + P : HEADER_F + P + n] = torch.stack(sums)
            ints[HEADER_I + self.local_batch : HEADER_I + self.local_batch + n] = torch.stack(bitsums)
        return torch.cat([floats.view(torch.int64), ints])

    def check(self, trainer: RunView) -> None:
        par = trainer.par
        error: BaseException | None = None
        try:
            local = self._local_vector(trainer)
        except Exception as e:  # still take part in the gather, so no rank waits for this one
            error = e
            local = torch.zeros(
                HEADER_F + 3 * self.n_params + HEADER_I + self.local_batch + self.n_params,
                dtype=torch.int64,
                device=self.device,
            )
            local[HEADER_F + 3 * self.n_params + 2] = 1
        if par.distributed:
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local)
            table = torch.stack(parts).cpu().numpy()
        else:
            table = local.cpu().numpy()[None]
        F = HEADER_F + 3 * self.n_params
        failed = [r for r in range(self.world) if table[r, F + 2]]
        if error is not None:
            raise error
        if failed:
            raise KilnError(
                f"the invariant check failed on rank(s) {_list(failed)} at step {trainer.step} (see their tracebacks)"
            )
        floats = np.ascontiguousarray(table[:, :F]).view(np.float64)
        ints = table[:, F:]
        violations = self._evaluate(trainer, floats, ints)
        if not violations:
            self.checks += 1
            return
        invariant, detail, ranks = violations[0]
        error = InvariantViolation(invariant, trainer.step, detail, ranks)
        if len(violations) > 1:
            others = sorted({v[0] for v in violations[1:]} - {invariant})
            if others:
                error.args = (f"{error.args[0]}; also violated: {', '.join(repr(o) for o in others)}",)
        trainer.log_event(
            {
                "step": trainer.step,
                "kind": "invariant",
                "invariant": invariant,
                "ranks": ranks,
                "message": str(error),
                "violations": [{"invariant": i, "detail": d, "ranks": r} for i, d, r in violations],
            }
        )
        raise error

    # ---------------------------------------------------------------- verdicts (the same on every rank)
    def _relation(self, a: int, b: int) -> str:
        ca, cb = self.metas[a]["coords"], self.metas[b]["coords"]
        return " and ".join(RELATION[d] for d, x, y in zip(DIM_NAMES, ca, cb) if x != y) or "the same coordinates"

    def _evaluate(self, trainer: RunView, floats: np.ndarray, ints: np.ndarray) -> list[tuple[str, str, list[int]]]:
        # 1. replicas identical
        out = self._replicas(floats, ints)

        # 2. disjoint data, 3. loss normaliser (only where this process saw the step's batch)
        has_data = bool(ints[:, 1].all())
        if has_data:
            samples = ints[:, HEADER_I : HEADER_I + self.local_batch]
            reps = {d: members[0] for d, members in sorted(self.dp_members.items())}
            out.extend(self._same_windows(samples))
            out.extend(self._disjoint_windows(samples, reps))
            out.extend(self._normaliser(floats, reps))

        # 4. optimizer steps
        out.extend(self._optimizer_steps(trainer, floats))
        return out

    def _replicas(self, floats: np.ndarray, ints: np.ndarray) -> list[tuple[str, str, list[int]]]:
        """Replicas identical: the first parameter whose fingerprint differs between ranks that
        must hold the same values."""
        P, lb = self.n_params, self.local_batch
        name_of = lambda r, i: self.metas[r]["names"][i].split(":", 1)[1]  # noqa: E731
        bad_params = []
        for _name, members in self.groups:
            (r0, i0), rest = members[0], members[1:]
            bits0, sq0 = ints[r0, HEADER_I + lb + i0], floats[r0, HEADER_F + P + i0]
            differ = [
                r
                for r, i in rest
                if ints[r, HEADER_I + lb + i] != bits0
                or abs(floats[r, HEADER_F + P + i] - sq0) > SUMSQ_RTOL * max(abs(sq0), 1e-300)
            ]
            if differ:
                bad_params.append((name_of(r0, i0), r0, differ))
        if not bad_params:
            return []
        name, r0, differ = bad_params[0]
        more = f" (and {len(bad_params) - 1} more parameters)" if len(bad_params) > 1 else ""
        ranks = [r0, *differ]
        return [
            (
                REPLICAS,
                f"{name} differs between ranks {r0} and {_list(differ)} ({self._relation(r0, differ[0])}){more}",
                ranks,
            )
        ]

    def _same_windows(self, samples: np.ndarray) -> list[tuple[str, str, list[int]]]:
        """Disjoint data, within a data-parallel rank: its tp / pp ranks read the same windows."""
        index = self._data["index"]
        out: list[tuple[str, str, list[int]]] = []
        for d, dp_ranks in sorted(self.dp_members.items()):
            for r in dp_ranks[1:]:
                if not np.array_equal(samples[r], samples[dp_ranks[0]]):
                    out.append(
                        (
                            DATA,
                            f"ranks {dp_ranks[0]} and {r} ({self._relation(dp_ranks[0], r)} of "
                            f"data-parallel rank {d}) read different windows of data batch {index}",
                            [dp_ranks[0], r],
                        )
                    )
                    break
        return out

    def _disjoint_windows(self, samples: np.ndarray, reps: dict[int, int]) -> list[tuple[str, str, list[int]]]:
        """Disjoint data, between data-parallel ranks (`reps`: one rank of each): no window read
        more often than the global batch spans epochs."""
        index, epochs = self._data["index"], self._data["epochs"]
        counts = Counter(int(w) for r in reps.values() for w in samples[r])
        over = sorted(w for w, c in counts.items() if c > epochs)
        if not over:
            return []
        owners = [r for r in reps.values() if over[0] in samples[r]]
        if len(owners) >= 2:
            a, b = owners[0], owners[1]
            shared = sorted(set(samples[a].tolist()) & set(samples[b].tolist()))
            da, db = self.metas[a]["dp"], self.metas[b]["dp"]
            return [
                (
                    DATA,
                    f"ranks {a} and {b} (data-parallel ranks {da} and {db}) both read "
                    f"window{'s' if len(shared) > 1 else ''} {_list(shared)} of data batch {index}",
                    owners,
                )
            ]
        a = owners[0]
        return [
            (
                DATA,
                f"rank {a} (data-parallel rank {self.metas[a]['dp']}) reads window {over[0]} "
                f"{counts[over[0]]} times in data batch {index}",
                [a],
            )
        ]

    def _normaliser(self, floats: np.ndarray, reps: dict[int, int]) -> list[tuple[str, str, list[int]]]:
        """Loss normaliser: every rank's equals the tokens predicted by the data-parallel ranks
        (`reps`: one rank of each)."""
        expected = max(1.0, sum(float(floats[r, 0]) for r in reps.values()))
        tol = 0.5 + 2.5e-7 * expected  # the normaliser is float32: exact below 2M tokens
        wrong = [r for r in range(self.world) if not np.isnan(floats[r, 1]) and not abs(floats[r, 1] - expected) <= tol]
        if not wrong:
            return []
        r = wrong[0]
        return [
            (
                NORMALISER,
                f"rank {r} normalises the loss by 1/{floats[r, 1]:.6g}, but the step's "
                f"{len(reps)} data-parallel rank(s) predict {expected:.0f} tokens"
                + (f" (also wrong on ranks {_list(wrong[1:])})" if len(wrong) > 1 else ""),
                wrong,
            )
        ]

    def _optimizer_steps(self, trainer: RunView, floats: np.ndarray) -> list[tuple[str, str, list[int]]]:
        step = trainer.step
        discarded = floats[:, 2]
        if not np.all(discarded == discarded[0]):
            r = int(np.argmax(discarded != discarded[0]))
            return [
                (
                    OPT_STEPS,
                    f"the guard discarded {discarded[0]:.0f} updates on rank 0 but {discarded[r]:.0f} on rank {r}",
                    [0, r],
                )
            ]
        applied = step - int(round(discarded[0]))
        counts: dict[str, dict[int, int]] = {}  # stage:name -> rank -> steps, for parameters the optimizer stepped
        for r, m in enumerate(self.metas):
            for i, (name, trained) in enumerate(zip(m["names"], m["trained"])):
                c = floats[r, HEADER_F + i]
                if trained and c >= 0:
                    counts.setdefault(name, {})[r] = int(round(c))
        plain = lambda name: name.split(":", 1)[1]  # noqa: E731
        for name, by_rank in counts.items():
            ranks = sorted(by_rank)
            other = next((r for r in ranks if by_rank[r] != by_rank[ranks[0]]), None)
            if other is not None:
                r0 = ranks[0]
                return [
                    (
                        OPT_STEPS,
                        f"{plain(name)} has taken {by_rank[r0]} optimizer steps on rank {r0} but "
                        f"{by_rank[other]} on rank {other} ({self._relation(r0, other)})",
                        [r0, other],
                    )
                ]
        counted = {name: next(iter(by_rank.values())) for name, by_rank in counts.items()}
        if self.calibrate:  # resumed without this callback's state: trust the counts once, check from now on
            top = max(counted.values(), default=applied)
            self.discarded = torch.as_tensor(float(step - top), dtype=torch.float64, device=self.device)
            self.late = {name: top - c for name, c in counted.items() if c < top}
            self.calibrate = False
            return []
        for name, c in counted.items():
            expected = applied - self.late.get(name, 0)
            if c != expected:
                ranks = sorted(counts[name])
                late = f", {self.late[name]} before it existed" if self.late.get(name) else ""
                where = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_list(ranks)}"
                return [
                    (
                        OPT_STEPS,
                        f"{plain(name)} has taken {c} optimizer steps on {where}, expected {expected} "
                        f"({step} steps, {step - applied} updates discarded by the guard{late})",
                        ranks,
                    )
                ]
        return []
