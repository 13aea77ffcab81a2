"""One change to a model: what planners produce, the rewrite makes and the record reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Edit"]


@dataclass
class Edit:
    """One change to the model.

    ``kind`` names the regularizer (``"stochastic_depth"``, ``"dropblock"``, ``"uout"`` …),
    ``module`` the module whose forward owns the site (``""`` for the root), ``node`` the fx node
    at the site. ``action`` says how the rewrite makes it:

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

    ``key``/``ordinal`` locate the node again when the owner is re-traced on its own.
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

    @classmethod
    def at(cls, site: Any, **fields: Any) -> Edit:
        """An edit located at ``site``: anything with ``owner``, ``node``, ``key``, ``ordinal``
        and ``source`` (a residual site, a dropout site, a stage's call site, a head place)."""
        return cls(
            module=site.owner,
            node=site.node,
            key=site.key,
            ordinal=site.ordinal,
            source=site.source,
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}
