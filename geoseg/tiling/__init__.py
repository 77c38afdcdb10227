"""Cutting a scene into tiles and putting the tiles' logits back together: ``tiles`` (tiles of a
fixed size, the cores that partition the scene, batches of tiles, the one window planner
``spaced_starts``) and ``blend`` (blending windows, the rolling band of weighted sums, decisions
from probabilities and per-class thresholds)."""
