"""The static HTML report of a training run (`featureshift report RUN`)."""
from .builder import build_report, channel_page, existing_timelines, layer_page

__all__ = ["build_report", "channel_page", "existing_timelines", "layer_page"]
