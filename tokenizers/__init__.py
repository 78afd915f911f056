"""Modality front-ends: each turns raw samples into Tokens (B, N, D) + coordinates."""
