"""stt: Spatial-then-Temporal self-supervised learning of video correspondence, on Ray."""

__version__ = "0.1.0"
