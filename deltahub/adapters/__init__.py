"""Built-in adapter kinds, one module each, registered through the ``deltahub.adapters`` entry-point group."""
