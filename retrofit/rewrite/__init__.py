"""Step 4, rewrite: execute a plan on the model in place (``execute.py``), outlining batch-mode
branches (``outline.py``); ``strip`` undoes it."""
