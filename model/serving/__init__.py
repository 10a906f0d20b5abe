"""m2rl.model.serving: `m2rl serve`, an OpenAI-compatible HTTP server over the project's own generator.

    request.py      a Request, the events it gets back (Prefilled, Token, Finished), its RequestHandle
    scheduler.py    continuous batching (pure of HTTP): admission, prefill, one decode step for all rows
    batch_cache.py  the running batch's KV cache: one row per sequence, each at its own length
    service.py      request fields -> SamplingParams, scheduler events -> per-choice text updates
    completions.py  /v1/completions;  chat.py  /v1/chat/completions and the M2 format's wire shapes
    text.py         incremental detokenization and stop strings
    weights.py      weight updates: read a checkpoint, check it against the served model
    protocol.py     pydantic request and response bodies;  errors.py  every error's status and body
    metrics.py      Prometheus;  app.py  the FastAPI routes;  cli.py  `m2rl serve`

This is the one place under `model/` that imports another m2rl package: the chat endpoint renders and
parses through `m2rl.agent.format`, the project's single implementation of the M2 format.
"""
