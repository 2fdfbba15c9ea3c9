"""Who may test what: the requester's address, verified domains, the public-address guard."""
