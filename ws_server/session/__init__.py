"""One conversation: the connection adapter, its history and the batched writer."""
