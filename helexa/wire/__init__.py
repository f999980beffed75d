"""Client dialects, as pure code: envelopes (``openai``, ``anthropic``, ``responses``),
request/response mapping (``translate``), SSE framing and stream translators (``streams``),
and error bodies (``errors``). OpenAI chat is the internal lingua franca; no I/O here.
"""
