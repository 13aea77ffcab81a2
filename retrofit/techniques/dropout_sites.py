"""The dropouts both fixes of Li et al. 2019 act on: those that reach a BatchNorm.

Li, Chen, Hu & Yang, "Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift", CVPR 2019. ``uout`` replaces each flagged dropout, ``dropout_fix`` removes it;
both read the training-mode Dropout→BN analysis (``analysis/dropout_bn.py``, owned by the
:class:`~retrofit.analysis.Analysis`) and build their edits here.
"""

from __future__ import annotations

from typing import Any

from retrofit.analysis.dropout_bn import DropoutBNAnalysis, DropoutSite
from retrofit.edit import Edit

__all__ = ["replace", "replaced", "victims", "why"]


def victims(result: DropoutBNAnalysis, site: DropoutSite) -> list[str]:
    return [pair.norm for pair in result.pairs if pair.site is site]


def why(result: DropoutBNAnalysis, site: DropoutSite) -> str:
    norms = victims(result, site)
    more = f" and {len(norms) - 1} more" if len(norms) > 1 else ""
    return f"reaches {norms[0]}{more}"


def replace(site: DropoutSite, kind: str, settings: Any, note: str, done: set[str]) -> Edit | None:
    """The edit that swaps one flagged dropout for a new layer (its typed ``settings``), or None
    when it cannot be made."""

    common = dict(kind=kind, settings=settings, note=note)
    if not site.fixable:
        return None
    if site.kind in ("module", "inside") and site.module:
        if site.module in done:  # one module called at several places is swapped once
            return None
        done.add(site.module)
        return Edit.at(site, **common, action="replace_module", target=site.module)
    if site.kind == "function":
        return Edit.at(site, **common, action="replace_call")
    return None


def replaced(edit: Edit) -> str:
    """What a replacing edit replaced, for a plan table: the module, or ``owner:node``."""
    if edit.action == "replace_module":
        return edit.target or edit.node
    return f"{edit.module or '<root>'}:{edit.node}"
