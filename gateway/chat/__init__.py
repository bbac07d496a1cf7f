"""The chat endpoints: protocol (request/response models), serving (the work), router (the routes)."""
