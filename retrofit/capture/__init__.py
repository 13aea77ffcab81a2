"""Step 1, capture: read a model's code as torch.fx graphs, symbolically where fx can and by
execution (a recorded real call, specialised) where it cannot, without changing the model."""
