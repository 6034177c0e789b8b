"""Reading and writing checkpoints: planning, data files, atomic commit."""
