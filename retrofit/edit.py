"""One change to a model: what planners produce, the rewrite makes and the record reports.

An edit says *where* (owner module, node) and *how*: its ``action`` is one of the small closed
set :data:`ACTIONS` (torch.fx's ``PassBase`` idea: each action states what it requires of the
edit and what it guarantees afterwards; ``retrofit/rewrite/execute.py`` implements each one).
*What* it inserts is the edit's ``settings``: the typed arguments of the technique's layer
(a frozen dataclass of the technique's module in ``retrofit/techniques/``), which the
technique's layer constructor reads. ``params`` is the same settings as a JSON-ready dict, for
the plan's ``to_dict`` and tables (derived from ``settings``, never read back into a layer).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["ACTIONS", "Action", "Edit"]


@dataclass(frozen=True)
class Action:
    """One way the rewrite can make an edit: ``requires`` (of the edit and its layer),
    ``ensures`` (what holds afterwards). ``graph``: made by editing the owner's traced forward
    (as opposed to swapping or setting a child module)."""

    name: str
    graph: bool
    requires: str
    ensures: str


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action(
            "wrap_arg",
            True,
            "a located node and ``arg``, the index of one of its arguments",
            "the node reads layer(argument) instead of the argument; nothing else changes",
        ),
        Action(
            "insert_after",
            True,
            "a located node with a tensor output",
            "every consumer of the node reads layer(output) instead",
        ),
        Action(
            "replace_call",
            True,
            "a located function call whose first argument is its tensor input (F.dropout)",
            "the call is gone; layer(first argument) takes its place for every consumer",
        ),
        Action(
            "outline",
            True,
            "a residual add, ``arg`` its branch operand; a layer taking the outlined calling "
            "convention ``layer(shortcut, *inputs, branch=f, outline=spec)`` (an ``outlined`` "
            "attribute); settings with ``subset`` (the branch runs on a subset of rows)",
            "training graph: the branch is a function the layer calls only when it keeps it "
            "(else masked, with the reason recorded); eval graph: ``wrap_arg`` on the branch",
        ),
        Action(
            "replace_module",
            False,
            "``target``, a child module (an nn.Identity slot, a Dropout)",
            "``target`` is the layer; strip puts the original back",
        ),
        Action(
            "set_rate",
            False,
            "``target``, an existing regularizer with a drop-rate attribute (timm's DropPath)",
            "its rate is 1 − survival and it is watched for the statistics; no layer is added",
        ),
    )
}


@dataclass
class Edit:
    """One change to the model.

    ``kind`` names the technique (its record's ``name``: ``"stochastic_depth"``, ``"dropblock"``
    …), ``module`` the module whose forward owns the site (``""`` for the root), ``node`` the fx
    node at the site. ``action`` says how the rewrite makes it, one of :data:`ACTIONS`:

    * ``"wrap_arg"``: wrap argument ``arg`` of the located node with a new module (a gate on the
      branch operand of a residual add);
    * ``"insert_after"``: feed the located node's output through a new module (DropBlock after a
      stage);
    * ``"replace_call"``: call a new module instead of the located function node;
    * ``"replace_module"``: swap the child module ``target`` for a new one (an ``nn.Identity``
      drop-path placeholder, a misplaced Dropout);
    * ``"set_rate"``: set the rate of the existing regularizer ``target`` (timm's DropPath,
      torchvision's StochasticDepth) — no second gate;
    * ``"outline"``: stochastic depth in batch/subset mode that skips the dropped branch's
      compute. In the owner's training graph the residual branch (operand ``arg`` of the located
      add) moves into a function the gate calls only when it keeps the branch, and the add becomes
      ``gate(shortcut, *inputs)``; the eval graph gets ``wrap_arg``. ``target``, if set, is an
      existing drop-path slot inside the branch: it stays in place at rate 0.

    ``settings``: the typed arguments of the layer the edit inserts (module docstring);
    ``params`` their JSON form (filled from ``settings`` when not given).
    ``key``/``ordinal`` locate the node again when the owner is re-traced on its own.
    ``regroup``: the located add ends a sum of several terms (an identity-first RepVGG/MobileOne
    block); before the edit, the rewrite regroups it as ``term #regroup + (the other terms)``
    (``retrofit.analysis.sums.regroup_sum``), so that operand ``arg`` is the whole branch.
    """

    kind: str
    module: str
    node: str
    action: str
    key: str = ""
    ordinal: int = 0
    arg: int | None = None
    target: str | None = None
    source: str | None = None
    depth: int | None = None
    survival: float | None = None
    block: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    regroup: int | None = None
    settings: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(
                f"edit action has to be one of {', '.join(ACTIONS)}, but got {self.action!r}"
            )
        if not self.params and self.settings is not None:
            to_params = getattr(self.settings, "params", None)
            self.params = to_params() if callable(to_params) else asdict(self.settings)

    @classmethod
    def at(cls, site: Any, **fields: Any) -> Edit:
        """An edit located at ``site``: anything with ``owner``, ``node``, ``key``, ``ordinal``
        and ``source`` (a residual site, a dropout site, a stage's call site, a head place),
        and the ``regroup`` of a residual site that is a sum of several terms."""
        return cls(
            module=site.owner,
            node=site.node,
            key=site.key,
            ordinal=site.ordinal,
            source=site.source,
            regroup=getattr(site, "regroup", None),
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        # settings are the typed form of params: the JSON has params only.
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        out.pop("settings")
        return {k: v for k, v in out.items() if v is not None and v != {}}
