"""The trainer seeds, saves and restores layers by their protocols, not by their class.

``retrofit.layers.protocol.SharedDraws`` (draws that must agree on every DDP rank) and
``Resumable`` (counters a checkpoint carries) are what ``retrofit.train`` reads. ``Tally`` below
is a test double that is no stochastic-depth gate: if the trainer went back to asking for the
gate's class, it would neither seed nor checkpoint it, and these tests fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

import retrofit
from retrofit.errors import ModelError
from retrofit.finetune_config import TrainConfig
from retrofit.layers.protocol import Resumable, SharedDraws
from retrofit.train import distributed as D
from retrofit.train.loop import _layer_counters, _mix, _seed_draws
from tests.user_models import tiny_resnet

TWO_RANKS = D.DistEnv(rank=1, world_size=2)


class Tally(nn.Module):
    """An identity that counts its calls (per rank) and its draws (shared by the ranks)."""

    kind = "tally"

    def __init__(self, shared: bool = True, seed: int | None = None) -> None:
        super().__init__()
        self.shared, self.seed = shared, seed
        self.calls, self.draws = 0, 0
        self.restored: list[tuple[list[int], bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        self.draws += 1
        return x

    def rates(self) -> dict[str, Any]:
        return {"calls": self.calls, "draws": self.draws, "seed": self.seed}

    def needs_shared_seed(self) -> bool:
        return self.shared

    def restart_draws(self) -> None:
        self.draws = 0

    def checkpoint_counters(self) -> list[int]:
        return [self.calls, self.draws]

    def restore_counters(self, saved: Sequence[int], *, own: bool) -> None:
        self.restored.append((list(saved), own))
        if own:
            self.calls = saved[0]
        self.draws = saved[1]


def _model(**kw: Any) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 3), Tally(**kw))


def test_the_double_is_no_gate_but_implements_the_protocols():
    layer = Tally()
    assert isinstance(layer, SharedDraws) and isinstance(layer, Resumable)
    assert not isinstance(nn.Linear(2, 2), SharedDraws | Resumable)


def test_shared_draws_get_a_seed_from_train_seed_and_their_kind():
    cfg = TrainConfig(seed=5)
    model = _model()
    model(torch.randn(4, 3))
    _seed_draws(model, None, cfg, TWO_RANKS)
    assert model[1].seed == _mix(5, "tally") % 2**31 and model[1].draws == 0
    # One process: the global RNG (seeded per rank) is fine, nothing is seeded or restarted.
    alone = _model()
    alone(torch.randn(4, 3))
    _seed_draws(alone, None, cfg, D.DistEnv())
    assert alone[1].seed is None and alone[1].draws == 1
    # A layer that need not agree is left alone; one the recipe seeded keeps its seed but
    # restarts its sequence.
    free = _model(shared=False)
    _seed_draws(free, None, cfg, TWO_RANKS)
    assert free[1].seed is None
    mine = _model(seed=3)
    mine(torch.randn(4, 3))
    _seed_draws(mine, None, cfg, TWO_RANKS)
    assert mine[1].seed == 3 and mine[1].draws == 0


def test_each_kind_is_seeded_apart_and_the_gates_salt_keeps_its_value():
    model = retrofit.apply(
        tiny_resnet(width=4, depth=2),
        {"stochastic_depth": {"p_L": 0.5, "mode": "batch"}},
        example_input=torch.randn(2, 3, 8, 8),
    )
    model.add_module("tally", Tally(shared=False))
    _seed_draws(model, None, TrainConfig(seed=0), TWO_RANKS)
    gates = [m for m in model.modules() if getattr(m, "kind", None) == "stochastic_depth"]
    # The number every run's batch-mode draws under DDP have come from since seeds were shared
    # (``_mix(0, "stochastic_depth") % 2**31``): changing it changes every distributed run.
    assert gates and all(g.seed == 1873308569 for g in gates)
    assert model.tally.seed is None  # the gates needed a seed, this kind did not


def test_resumable_counters_are_saved_and_restored_by_the_trainer():
    cfg = TrainConfig(seed=0)
    model = _model()
    model(torch.randn(4, 3)), model(torch.randn(2, 3))
    saved = _layer_counters(model)
    assert saved == {"1": [6, 2]}

    again = _model()
    ckpt = {"per_rank": [{"gates": saved}]}
    _seed_draws(again, ckpt, cfg, D.DistEnv())
    assert (again[1].calls, again[1].draws) == (6, 2) and again[1].restored == [([6, 2], True)]

    # Another world size: rank 0's record, and only what the ranks share comes back.
    other = _model()
    two = {"per_rank": [{"gates": {"1": [6, 2]}}, {"gates": {"1": [7, 2]}}]}
    _seed_draws(other, two, cfg, D.DistEnv())
    assert (other[1].calls, other[1].draws) == (0, 2) and other[1].restored == [([6, 2], False)]

    with pytest.raises(ModelError, match="keeps none"):
        _seed_draws(_model(), {"per_rank": [{"gates": {"0": [1, 1]}}]}, cfg, D.DistEnv())


def test_a_gates_checkpoint_counters_keep_their_format():
    model = retrofit.apply(
        tiny_resnet(width=4, depth=2),
        {"stochastic_depth": {"p_L": 0.5, "mode": "batch", "seed": 1}},
        example_input=torch.randn(2, 3, 8, 8),
    )
    model.train()
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8))
    saved = _layer_counters(model)
    gate = next(m for m in model.modules() if getattr(m, "kind", None) == "stochastic_depth")
    name = next(n for n, m in model.named_modules() if m is gate)
    assert saved[name] == [gate.calls, gate.kept, gate.draws] and saved[name][::2] == [6, 3]

    fresh = retrofit.apply(
        tiny_resnet(width=4, depth=2),
        {"stochastic_depth": {"p_L": 0.5, "mode": "batch", "seed": 1}},
        example_input=torch.randn(2, 3, 8, 8),
    )
    gate = fresh.get_submodule(name)
    gate.restore_counters([6, 4], own=True)  # a checkpoint from before draws were saved
    assert (gate.calls, gate.kept, gate.draws) == (6, 4, 0)
    gate.restore_counters([8, 2, 5], own=False)  # rank 0's record: only the draw position
    assert (gate.calls, gate.kept, gate.draws) == (6, 4, 5)
    gate.restore_counters([8, 2, 5], own=True)
    assert (gate.calls, gate.kept, gate.draws) == (8, 2, 5)
