"""OpenAI Responses as a client dialect, translated to and from OpenAI chat."""
