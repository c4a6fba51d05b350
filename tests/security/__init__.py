"""Who may talk to the node: allow-list, TLS, audit trail, no patient identifiers, permissions."""
