"""dus-plugin: SOLAR-style depth up-scaling (DUS) of language models through mergekit."""

__version__ = "0.1.0"
