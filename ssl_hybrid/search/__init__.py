"""Architecture search over the hybrid design space under a measured compute budget (``ssl-hybrid search``)."""
