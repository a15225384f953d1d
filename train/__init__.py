"""Continued pretraining for depth-up-scaled models (shipped as dus_plugin.train)."""
