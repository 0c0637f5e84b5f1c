"""The sync worker: change events -> chunks -> embeddings -> pgvector."""
