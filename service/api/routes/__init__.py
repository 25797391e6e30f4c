"""One router per resource: health (probes, metrics), models, sample."""
