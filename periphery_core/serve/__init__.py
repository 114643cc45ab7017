"""`periphery serve`: an OpenAI-compatible HTTP endpoint for a language model on the cluster."""
