"""Step 2, analysis: what the graphs say — residual sites, conv stages, Dropout → BatchNorm paths,
branch regions — found once per model in one context (``context.py``)."""
