"""The embedded default: a tiny real-architecture policy, an in-code tokenizer and a verifiable task."""
