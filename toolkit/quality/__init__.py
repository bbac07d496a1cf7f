"""What the build measures and gates on: golden prompts, fidelity and task gates, scoring, retention, portability."""
