"""Anthropic Messages as a client dialect, translated to and from OpenAI chat."""
