"""tunedex: keep a fine-tuned LLM and its knowledge index fresh, serve both with sources."""
