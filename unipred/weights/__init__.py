"""Layer 6, weights in and out: the official NEPA release's key layout (hub) and the
``from_pretrained`` / ``save_pretrained`` / ``unipred export`` folder format (pretrained)."""
