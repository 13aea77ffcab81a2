"""``retrofit-cli compare``: an ablation of recipes × seeds through the trainer, and its table.

::

    retrofit-cli compare --model resnet18 --recipes none.yaml sd.yaml cutout.yaml --seeds 5 --out DIR

Modules, one job each:

- ``variants``  recipe files → variants (name = file stem, optional ``model_kwargs:``), the shared
                settings, run fingerprints
- ``runs``      one run through ``retrofit.train.fit``: resumable, its ``result.json`` record
- ``stats``     means, 95% confidence intervals, Welch's t-test (pure, standard library only)
- ``report``    records → the table (Markdown, JSON) and the plot
- ``command``   the command line: arguments, checks before any run, the progress bar, exit codes

Nothing here imports torch at import time (``--help`` stays instant).
"""

from retrofit.compare.command import main

__all__ = ["main"]
