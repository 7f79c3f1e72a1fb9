"""`dreambooth serve`: the HTTP server over the generation API (needs the `serve` extra).

- `app`: the FastAPI app, its settings and `run_server`;
- `routes`: the OpenAI, OpenRouter and A1111 routes;
- `schemas`: request models and OpenAI-shaped errors;
- `batching`: one worker per model that batches compatible requests;
- `metrics`: Prometheus metrics.
- `jobs`, `job_process`, `job_guard`, `job_routes`: the fine-tuning jobs API (state, the
  training processes, keeping one per job and none without its server, routes).
"""
