"""edge: on-device learning with layer-local self-supervised rules."""

__version__ = "0.1.0"
