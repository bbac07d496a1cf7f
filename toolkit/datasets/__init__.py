"""Chat datasets: the loader and splitter (records), and the bundled demo dataset and control prompts (JSON)."""
