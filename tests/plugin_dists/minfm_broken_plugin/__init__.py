"""A plugin that fails on import: minFM must report it by name and load the others."""

raise RuntimeError("this plugin is broken on purpose")
