"""FastAPI app: OpenAI routes, /v1/interventions, errors, auth, metrics."""
