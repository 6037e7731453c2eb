"""Data sources: each yields chunks of raw columns that the FeatureSpec encodes."""
