"""The loss landscape on a random plane and the implicit-update path across it."""
