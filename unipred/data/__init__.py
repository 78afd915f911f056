"""Data readers, packers, transforms and bad-sample accounting."""
