"""A plugin module that fails on import, as a plugin with a missing dependency would."""

raise RuntimeError("the toy broken plugin cannot be imported")
