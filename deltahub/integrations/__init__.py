"""Integrations with serving engines (vLLM); each imports its engine only when used."""
