"""One :class:`~monailabel.interfaces.config.TaskConfig` per file; ``main.py`` discovers them."""
