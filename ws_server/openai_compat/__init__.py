"""The OpenAI-compatible chat endpoint, ``POST /v1/chat/completions`` (design.md, *OpenAI-
compatible chat*): ``request.py`` reads a request, ``wire.py`` writes OpenAI's objects and
events (both pure), ``stream.py`` turns a session's frames into them, ``endpoint.py``
runs one short-lived session per request."""
