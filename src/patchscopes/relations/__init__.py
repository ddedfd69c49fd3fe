"""Relations data and linear relational embeddings / concepts."""
