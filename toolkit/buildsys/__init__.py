"""The build's machinery: its config, the stage interface, reports, logs, the memory guard and code digests."""
