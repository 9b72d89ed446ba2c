"""The OpenAI-compatible server: protocol checks, the batching loop thread, the HTTP app and its chat page."""
