"""Edge runtime: composes local spans, the center client, fallback and the CLI."""
