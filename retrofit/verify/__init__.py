"""Step 5, verify: the eval output unchanged and every inserted layer live in a training step
(``checks.py``), run with the model's training call (``training_call.py``)."""
