"""Dataset readers (official layouts), the synthetic generator, and the training data stream."""
