"""Operating the project: the team tracking server, a local tracking server for tests, the kill soak."""
