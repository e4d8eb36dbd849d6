"""The fuzz suite: seeded mutations of real inputs through every reader and command that takes a file."""
