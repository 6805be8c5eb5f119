"""The device's own service: the OpenAI-compatible HTTP API over a local or split model (`server`)."""
