"""``toolkit chat``: an interactive terminal chat (and one-shot answers) against the gateway."""
