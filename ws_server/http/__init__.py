"""The HTTP side of the chat port: routes, static files, access control and limits."""
