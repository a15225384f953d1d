"""Evaluation hooks: perplexity and lm-evaluation-harness (shipped as dus_plugin.eval)."""
