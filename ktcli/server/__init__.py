"""`ktcli serve`: an OpenAI-compatible HTTP server over the same engine as chat (Starlette + uvicorn)."""
