"""The on-disk world: checkpoint indexes, the expert-aligned store, readers. Never imported by the model."""
