"""The papers' case studies as evaluations (one module each); the CLI only calls into these."""
