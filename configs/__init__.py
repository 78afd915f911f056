"""The recipes (YAML), shipped inside the package; see ``unipred.config.find_config``."""
