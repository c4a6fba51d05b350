"""Research baselines quoted by the model cards; the node never imports them."""
