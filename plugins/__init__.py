"""Built-in minFM plugins. Each subpackage is one plugin, registered through the
``minfm`` entry-point group exactly like a third-party plugin."""
