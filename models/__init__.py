"""Networks, shared transforms, training, evaluation and shipped weights for cxrnode."""
