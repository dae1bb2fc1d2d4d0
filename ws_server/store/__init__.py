"""Where sessions live between connections: an interface and its implementations
(``memory``: process memory, the embedded default; Redis for several nodes comes next)."""
