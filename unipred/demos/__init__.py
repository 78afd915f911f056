"""Self-contained demos on data generated or shipped locally: `unipred demo image|audio|video`."""
