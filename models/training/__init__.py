"""Training loops for the lung segmenters and the TB scorer (torch imported lazily by callers)."""
